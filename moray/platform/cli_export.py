"""`moray export`: a training checkpoint (any layout) -> a Hugging Face or moray model directory.

    moray export --run runs/tiny --to-hf out/tiny-hf              # latest committed step
    moray export --run runs/tiny --step 200 --to-moray out/tiny   # what `moray convert` writes
    moray export --checkpoint s3://bucket/ckpt/step_0000200 --config runs/tiny/config.yaml --to-hf out/x

--run takes a run directory (its config.yaml gives the model and train.storage);
--checkpoint a checkpoint root or step directory, local or a pyarrow URI, for
checkpoints stored away from their run (then --config, unless the step sits under
<run>/checkpoints/). The output is local. Errors are one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from moray.platform.cli_convert import DTYPES, USER_ERRORS, parse_size  # noqa: F401  (USER_ERRORS: cli.py)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="export a training checkpoint as a Hugging Face Mixtral or moray directory",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="DIR", help="a run directory (runs/NAME)")
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint root or step directory (path or URI)")
    p.add_argument("--step", type=int, default=None, help="the step to export (default: the latest committed)")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--to-hf", metavar="DIR", help="write a MixtralForCausalLM directory here")
    dst.add_argument("--to-moray", metavar="DIR", help="write a moray directory (moray_config.yaml) here")
    p.add_argument("--config", metavar="FILE", help="the run's config.yaml, when it is not beside the checkpoint")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast tensors (default: keep the stored dtype)")
    p.add_argument("--master-weights", action="store_true",
                   help="export a bf16 run's fp32 master copies instead of its bf16 parameters")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB", help="output shard size (default 5GB)")
    p.add_argument("--no-verify", action="store_true", help="skip checksumming the checkpoint against its manifest")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in the output directory")
    p.set_defaults(func=run)
    return p


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def run(args: argparse.Namespace) -> int:
    import torch

    from moray.model import count_params
    from moray.platform.export import export_checkpoint
    from moray.platform.weights import RUN_CONFIG, WeightsError, read_run_config

    if args.run and not (Path(args.run) / RUN_CONFIG).is_file():
        what = "no such run directory" if not Path(args.run).exists() else f"not a run directory (no {RUN_CONFIG})"
        raise WeightsError(f"--run {args.run}: {what}; runs live in runs/NAME (train.runs_dir/train.run_name), "
                           f"or use --checkpoint for a checkpoint root or step directory")
    model_cfg = read_run_config(args.config)[0] if args.config else None
    fmt, out = ("hf", args.to_hf) if args.to_hf else ("moray", args.to_moray)
    res = export_checkpoint(args.run or args.checkpoint, out, fmt, args.step,
                            getattr(torch, args.dtype) if args.dtype else None, model_cfg, args.overwrite,
                            args.max_shard_size, verify=not args.no_verify, master=args.master_weights)
    cfg, n = res.source.cfg, count_params(res.source.cfg)
    layout = " ".join(f"{k} {v}" for k, v in (res.layout or {}).items() if k != "world_size") or "unknown"
    target = "Hugging Face" if fmt == "hf" else "moray"
    print(f"exported step {res.source.step} ({res.source.where}, saved under {layout}) -> {target} {res.out} "
          f"in {res.seconds:.1f} s")
    print(f"  model: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_experts} experts top-{cfg.top_k}: "
          f"{_human(n.total)} parameters; wrote {_human(res.bytes, 'B')}: {', '.join(res.files)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """`moray export ...` without the rest of the CLI (same errors, same exit codes)."""
    from moray.platform.cli import main as cli_main

    return cli_main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
