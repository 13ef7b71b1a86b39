"""What the Ray pipeline costs: tokens/s of distributed pretraining on a local Ray
cluster against the same model and global batch stepped in one process, and the
pipeline bubble measured against (p-1)/(m+p-1).

    python bench/pretrain_overhead.py [--steps 12] [--only etp ZeRO ...]

On 2 CPU cores the workers share the cores, so the ratio shows overhead
(scheduling, gloo collectives, pipeline sends), not speed-up. The tensor-parallel
rows split every block, the head and the loss over 2 ranks (with sequence
parallelism also the norms, the residual stream and the routing); their global
batch is dp 1's, half the others', and the ratio is of tokens/s. The etp-1
rows keep every expert whole and spread the expert group over the tensor ranks
(and dp); the ZeRO-1 rows reduce-scatter gradients in 1 MiB buckets during the
backward or after it; the recompute rows rebuild attention only, or every
other block, in backward. The load average is recorded: the cores are shared.
Results: bench/results/pretrain_overhead.json (a --only subset: pretrain_overhead_subset.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYOUTS = {
    "pp2 x ep2 (4 workers)": ["parallel.pp=2", "parallel.ep=2", "cluster.num_workers=4"],
    "pp2 (2 workers)": ["parallel.pp=2", "parallel.ep=1", "cluster.num_workers=2"],
    "dp2 + ZeRO-1 (2 workers)": ["parallel.pp=1", "parallel.ep=1", "cluster.num_workers=2"],
    # Tensor parallelism: vocabulary-parallel head and loss, with and without sequence parallelism.
    "tp2 (2 workers)": ["parallel.tp=2", "parallel.pp=1", "parallel.ep=1", "cluster.num_workers=2"],
    "tp2 + SP (2 workers)": ["parallel.tp=2", "parallel.pp=1", "parallel.ep=1", "cluster.num_workers=2",
                             "parallel.sequence_parallel=true"],
    "pp2 x tp2 + SP (4 workers)": ["parallel.tp=2", "parallel.pp=2", "parallel.ep=1", "cluster.num_workers=4",
                                   "parallel.sequence_parallel=true"],
    # Experts whole (etp 1), the expert group across the tensor ranks: ep 2 inside tp 2, ep 4 over tp 2 x dp 2.
    "tp2 + SP, ep2 etp1 (2 workers)": ["parallel.tp=2", "parallel.pp=1", "parallel.ep=2", "parallel.etp=1",
                                       "cluster.num_workers=2", "parallel.sequence_parallel=true"],
    "tp2 x dp2 + SP, ep4 etp1 (4 workers)": ["parallel.tp=2", "parallel.pp=1", "parallel.ep=4", "parallel.etp=1",
                                             "cluster.num_workers=4", "parallel.sequence_parallel=true"],
    # ZeRO-1 reduce-scatter in 1 MiB buckets, launched during the backward or after it.
    "dp2 ZeRO-1, 1 MiB buckets overlapped": ["parallel.pp=1", "parallel.ep=1", "cluster.num_workers=2",
                                             "parallel.grad_bucket_mb=1"],
    "dp2 ZeRO-1, 1 MiB buckets after bwd": ["parallel.pp=1", "parallel.ep=1", "cluster.num_workers=2",
                                            "parallel.grad_bucket_mb=1", "parallel.overlap_grad_reduce=false"],
    # Selective recomputation: attention only; every other block.
    "pp2 x ep2, recompute attention": ["parallel.activation_checkpointing=true", "parallel.recompute=attention"],
    "pp2 x ep2, recompute every 2nd": ["parallel.activation_checkpointing=true", "parallel.recompute_every=2"],
}


def one_process(cfg, steps: int) -> dict:
    """The same model, global batch and microbatch split, in this process: the baseline."""
    import torch

    from moray.data import MixtureSampler
    from moray.model import build_model
    from moray.model.moe import set_aux_grad_scale

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, seed=cfg.train.seed)
    m = cfg.parallel.num_microbatches
    set_aux_grad_scale(model, 1.0 / m)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay)
    sampler = MixtureSampler.from_config(cfg)
    seqs = 2 * cfg.train.micro_batch_size * m  # dp 2's global batch, as in the distributed runs
    times = []
    for _ in range(steps):
        x = torch.as_tensor(sampler.next_batch(seqs), dtype=torch.long)
        start = time.perf_counter()
        opt.zero_grad()
        for chunk in x.chunk(2 * m):
            logits = model(chunk[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten()) / (2 * m)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[2:])
    return {"step_s": step_s, "tokens_per_s": seqs * cfg.train.seq_len / step_s}


def on_ray(overrides, steps: int, data_dir: str) -> dict:
    from moray.platform.config import load_config
    from moray.platform.controller import run_pretraining

    with tempfile.TemporaryDirectory() as runs:
        cfg = load_config(ROOT / "configs/tiny.yaml", [f"train.runs_dir={runs}", "train.run_name=bench",
                                                      f"data.dir={data_dir}", f"train.max_steps={steps}",
                                                      f"train.checkpoint_every={steps}", *overrides])
        metrics = run_pretraining(cfg).metrics
    steady = [m for m in metrics if m["step"] >= 2]
    step_s = statistics.median(m["step_seconds"] for m in steady)
    measured = [m["bubble_measured"] for m in steady if m.get("bubble_measured") is not None]
    return {"step_s": step_s, "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steady),
            "bubble_theory": steady[0]["bubble"], "bubble_measured": statistics.median(measured) if measured else None,
            "load_average_after": os.getloadavg()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--only", nargs="*", help="run only the layouts whose name contains one of these")
    args = p.parse_args()
    layouts = {k: v for k, v in LAYOUTS.items() if not args.only or any(o in k for o in args.only)}

    from moray.data.preparation import ensure_prepared
    from moray.platform.config import load_config

    data_dir = str(ROOT / "data" / "demo")
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"data.dir={data_dir}"])
    ensure_prepared(cfg, log=lambda *_: None)
    # The baseline runs before and after the Ray runs; the faster of the two is the one
    # least disturbed by whatever else the shared machine was doing.
    load_before = os.getloadavg()[0]  # the cores are shared: a busy machine makes every ratio smaller
    first = one_process(cfg, args.steps)
    ray_rows = [{"layout": name, **on_ray(overrides, args.steps, data_dir)} for name, overrides in layouts.items()]
    second = one_process(cfg, args.steps)
    base = min(first, second, key=lambda r: r["step_s"])
    rows = [{"layout": "one process (baseline)", **base, "ratio": 1.0,
             "baseline_step_s_before_after": [first["step_s"], second["step_s"]]}]
    rows += [{**r, "ratio": r["tokens_per_s"] / base["tokens_per_s"]} for r in ray_rows]

    print(f"\n{'layout':<40}{'step s':>9}{'tokens/s':>11}{'vs 1 proc':>11}{'bubble':>9}{'measured':>10}{'load':>6}")
    for r in rows:
        theory = f"{r['bubble_theory']:.1%}" if r.get("bubble_theory") else "-"
        measured = f"{r['bubble_measured']:.1%}" if r.get("bubble_measured") is not None else "-"
        load = f"{r['load_average_after']:.1f}" if "load_average_after" in r else "-"
        print(f"{r['layout']:<40}{r['step_s']:>9.3f}{r['tokens_per_s']:>11,.0f}{r['ratio']:>10.2f}x"
              f"{theory:>9}{measured:>10}{load:>6}")
    out = ROOT / f"bench/results/pretrain_overhead{'_subset' if args.only else ''}.json"
    print(f"1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (on 2 cores)")
    out.write_text(json.dumps({"rows": rows, "steps": args.steps, "model": "configs/tiny.yaml",
                               "load_average_before_after": [load_before, os.getloadavg()[0]],
                               "machine": "2 CPU cores, local Ray cluster, float32"}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
