"""Gradient reduction overlapped with the backward, against reduction after it (CPU, gloo).

    python bench/grad_overlap.py [--steps 8] [--bucket-mb 4]

Two data-parallel ranks (spawned processes, one thread each, gloo) train the
same model under each setting, steps interleaved (A, B, A, B, ...) so the
shared machine's load falls on both alike. Per setting: the forward + backward
time (with overlap it includes launching the buckets' collectives), the wait
after it for the reduction to finish, and their sum, which is what overlap
saves on (medians over the steps after the first two). ZeRO-1 reduce-scatters
and all-gathers; ZeRO-0 all-reduces. On 2 shared cores the reduction's
gloo thread competes with the backward for a core, so the gain here is a lower
bound of what a GPU (compute and NCCL on separate engines) sees.
Results: bench/results/grad_overlap.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Large enough that reducing its gradients (13M parameters, 52 MB in float32) takes as long as a good
# part of the backward on these cores; small batches for the same reason.
MODEL = dict(vocab_size=320, d_model=256, n_layers=4, n_heads=4, n_kv_heads=1, ffn_hidden=1024, mlp="swiglu",
             n_experts=4, top_k=2, max_seq_len=128)
SETTINGS = {
    "ZeRO-1, overlapped": dict(zero=1, overlap_grad_reduce=True),
    "ZeRO-1, after backward": dict(zero=1, overlap_grad_reduce=False),
    "ZeRO-0, overlapped": dict(zero=0, overlap_grad_reduce=True),
    "ZeRO-0, after backward": dict(zero=0, overlap_grad_reduce=False),
}


def _worker(rank: int, world: int, steps: int, bucket_mb: float) -> dict:
    import torch

    from moray.model import ModelConfig
    from moray.parallel import ParallelConfig, ParallelDims, TrainEngine

    cfg = ModelConfig(**MODEL)
    engines = {}
    for name, extra in SETTINGS.items():
        pcfg = ParallelConfig(microbatches=2, grad_bucket_mb=bucket_mb, **extra)
        engines[name] = TrainEngine(cfg, pcfg, ParallelDims.from_config(pcfg, world), rank, "cpu", seed=0, lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    times = {name: [] for name in SETTINGS}
    for _ in range(steps):
        tokens = torch.randint(0, cfg.vocab_size, (4, 65), generator=g)
        for name, engine in engines.items():
            engine.step(tokens)
            times[name].append(dict(engine.timings))
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--bucket-mb", type=float, default=4.0)
    args = p.parse_args()

    from dist_utils import spawn

    load_before = os.getloadavg()[0]
    per_rank = spawn(_worker, 2, args.steps, args.bucket_mb)
    load_after = os.getloadavg()[0]
    rows = []
    for name in SETTINGS:
        steady = [t for r in per_rank for t in r[name][2:]]
        fb = statistics.median(t["forward_backward_s"] for t in steady)
        wait = statistics.median(t["reduction_wait_s"] for t in steady)
        total = statistics.median(t["forward_backward_s"] + t["reduction_wait_s"] for t in steady)
        rows.append({"setting": name, "forward_backward_s": fb, "reduction_wait_s": wait, "total_s": total})
    print(f"\n{'setting':<26}{'fwd+bwd s':>11}{'wait s':>9}{'sum s':>9}")
    for r in rows:
        print(f"{r['setting']:<26}{r['forward_backward_s']:>11.3f}{r['reduction_wait_s']:>9.3f}{r['total_s']:>9.3f}")
    for zero in ("ZeRO-1", "ZeRO-0"):
        on, off = (next(r for r in rows if r["setting"] == f"{zero}, {k}") for k in ("overlapped", "after backward"))
        saved = 1 - on["total_s"] / off["total_s"]
        print(f"{zero}: overlapped {on['total_s']:.3f} s vs {off['total_s']:.3f} s after the backward: "
              f"{'saves' if saved >= 0 else 'costs'} {abs(saved):.0%}")
    print(f"1-minute load average {load_before:.1f} before, {load_after:.1f} after (on 2 cores)")
    out = ROOT / "bench/results/grad_overlap.json"
    out.write_text(json.dumps({"rows": rows, "steps": args.steps, "bucket_mb": args.bucket_mb, "model": MODEL,
                               "machine": "2 shared CPU cores, 2 gloo ranks, float32, 1 thread each",
                               "load_average_before_after": [load_before, load_after]}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
