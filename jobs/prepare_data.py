"""Prepare training data: tokenize the configured sources and pack them into shards.

    python jobs/prepare_data.py --config configs/tiny.yaml [--set data.dir=...] [--verify] [--local]
    ray job submit --working-dir . -- python jobs/prepare_data.py --config configs/tiny.yaml

Runs on Ray Data (RAY_ADDRESS / cluster.address, or an embedded local cluster);
--local runs the same steps in this process without Ray. With data.demo_corpus
the standard-library demo sources are written first. A rerun over unchanged
inputs writes nothing. Under `ray job submit` relative paths resolve inside
Ray's copy of the working directory: point data.dir at a shared absolute path
or a URI when the shards must outlive the job.
"""

from __future__ import annotations

import sys
import time

import _common

from moray.data.manifest import DataError
from moray.data.preparation import configured_data, prepare
from moray.data.sources import SourceError
from moray.data.tokenizer import TokenizerError


def main(argv=None) -> int:
    ap = _common.parser(__doc__.splitlines()[0])
    ap.add_argument("--verify", action="store_true", help="re-hash shards already on disk instead of trusting them")
    ap.add_argument("--local", action="store_true", help="run in this process, without Ray")
    args = ap.parse_args(argv)
    cfg = _common.load(args)
    try:
        return run(cfg, args)
    except (DataError, SourceError, TokenizerError) as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 2


def run(cfg, args) -> int:
    data = configured_data(cfg)
    t0 = time.perf_counter()
    started = False
    map_fn = None
    if not args.local:
        from moray.data.ray_prepare import connect, ray_map

        started = connect(cfg.cluster.address)
        map_fn = ray_map
    try:
        result = prepare(data, cfg.train.seq_len, map_fn=map_fn, verify=args.verify)
    finally:
        if started:
            import ray

            ray.shutdown()
    seconds = time.perf_counter() - t0

    m = result.manifest
    print(f"\n{'source':<12}{'format':<8}{'mix':>10}{'docs':>9}{'shards':>8}{'sequences':>11}{'tokens':>12}")
    for s in m.sources:
        mix = f"{s.epochs:g} ep" if s.epochs is not None else (f"w {s.weight:g}" if s.weight is not None else "1 ep")
        print(f"{s.name:<12}{s.format:<8}{mix:>10}{s.documents:>9}{len(s.shards):>8}{s.sequences:>11}{s.tokens:>12}")
    tokens = sum(s.tokens for s in m.sources)
    print(
        f"\n{m.path}: tokenizer {m.tokenizer['id']}, seq_len {m.seq_len}, data id {m.id}\n"
        f"{len(result.written)} shard(s) written, {len(result.reused)} reused, {len(result.removed)} removed; "
        f"manifest {'written' if result.manifest_written else 'unchanged'}; {tokens:,} tokens in {seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
