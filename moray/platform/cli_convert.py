"""`moray convert`: Hugging Face Mixtral checkpoints <-> moray checkpoint directories.

    moray convert --from-hf HF_DIR --out MORAY_DIR   # config.json + *.safetensors -> moray_config.yaml + model.safetensors
    moray convert --to-hf MORAY_DIR --out HF_DIR     # loadable by MixtralForCausalLM.from_pretrained

Streams one layer at a time, so converting a model needs about one output
shard of memory, not the whole model. Imports only torch and safetensors
(no Ray, no pydantic). `cli.py` registers it (`add_parser`, `USER_ERRORS`);
`python -m moray.platform.cli_convert convert ...` runs it alone.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

DTYPES = ("float32", "bfloat16", "float16")
# "The request is wrong" (cli.py prints these as one line, exit 2): a missing or mismatched
# checkpoint, a config moray cannot represent (CheckpointError and those are ValueErrors), I/O.
USER_ERRORS = (ValueError, OSError)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or plain bytes -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB, 500MB or 1000000")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert", help="convert checkpoints between Hugging Face Mixtral and moray",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="DIR", help="a Hugging Face MixtralForCausalLM directory to import")
    src.add_argument("--to-hf", metavar="DIR", help="a moray checkpoint directory to export")
    p.add_argument("--out", metavar="DIR", required=True, help="where to write (must be new or empty)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast tensors (default: keep the stored dtype)")
    p.add_argument("--max-shard-size", type=parse_size, default="5GB",
                   help="split the output into shards of at most this size (default 5GB, as save_pretrained)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from moray.model import count_params
    from moray.model.hf import convert_hf_to_moray, convert_moray_to_hf

    dtype = getattr(torch, args.dtype) if args.dtype else None
    start = time.perf_counter()
    if args.from_hf:
        cfg = convert_hf_to_moray(args.from_hf, args.out, dtype, args.max_shard_size, args.overwrite)
        direction = f"Hugging Face {args.from_hf} -> moray {args.out}"
    else:
        cfg = convert_moray_to_hf(args.to_hf, args.out, dtype, args.max_shard_size, args.overwrite)
        direction = f"moray {args.to_hf} -> Hugging Face {args.out}"
    n = count_params(cfg)

    def human(x: int) -> str:
        return f"{x / 1e9:.2f}B" if x >= 1e9 else f"{x / 1e6:.2f}M"

    files = sorted(p.name for p in Path(args.out).iterdir())
    print(f"converted {direction} in {time.perf_counter() - start:.1f} s")
    print(f"  model: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads / {cfg.n_kv_heads} KV, "
          f"{cfg.n_experts} experts top-{cfg.top_k}: {human(n.total)} total, {human(n.active)} active parameters")
    print(f"  wrote: {', '.join(files)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """`moray convert ...` without the rest of the CLI (same errors, same exit codes)."""
    parser = argparse.ArgumentParser(prog="moray")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"moray convert: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
