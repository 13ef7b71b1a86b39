"""Pretrain a MoE transformer on Ray.

    python jobs/pretrain.py --config configs/tiny.yaml [--set k=v ...] [--resume auto|never|PATH]
    python jobs/pretrain.py --config configs/gpt4.yaml --dry-run --set cluster.num_workers=24960
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/tiny.yaml

--dry-run checks the layout, builds every rank's part on the meta device (no
weights, no workers, no Ray), prints each pipeline stage's parameters and
modelled memory per rank, and exits 0 when the run would start and fit
(1, with the reasons, when not): moray/platform/dry_run.py.

With no RAY_ADDRESS it starts an embedded local Ray cluster. The run writes
runs/<run_name>/ (config.yaml, metrics.jsonl, events.jsonl, checkpoints/,
loss.png); under `ray job submit` relative paths land in Ray's copy of the
working directory, so point train.runs_dir / train.storage at an absolute path
or a storage URI for a run that must outlive the job.
"""

from __future__ import annotations

import sys

import _common


def main(argv=None) -> int:
    p = _common.parser(__doc__.splitlines()[1])
    p.add_argument("--resume", default="auto",
                   help="auto: from the latest committed checkpoint if any; never: start fresh; "
                        "or a checkpoint path / step number")
    p.add_argument("--dry-run", action="store_true",
                   help="check the layout and each rank's memory without running (no Ray, no weights)")
    args = p.parse_args(argv)
    cfg = _common.load(args)
    if args.dry_run:
        from moray.platform.dry_run import dry_run, render

        report = dry_run(cfg)
        print(render(report), file=sys.stdout if report.ok else sys.stderr)
        return 0 if report.ok else 1

    from moray.data import DataError, TokenizerError
    from moray.data.sources import SourceError
    from moray.platform.config import ConfigError
    from moray.platform.controller import RunFailed, run_pretraining

    try:
        run_pretraining(cfg, resume=args.resume)  # prints a line per step and a summary at the end
    except (ConfigError, RunFailed, DataError, SourceError, TokenizerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
