"""Seconds from a failure to training again, on a local Ray cluster, split into
detection, restart, checkpoint load and catch-up; beside it, the training stall
per checkpoint with async against sync save (bench/checkpoint_stall.py).

    python bench/recovery.py [--kill-at 7] [--steps 10]

A worker is killed (train.chaos) in the middle of a pp-2 run; the events and
metrics the run writes give every figure. Results: bench/results/recovery.json,
which `moray plan` reads for its goodput defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(kill_at: int, steps: int, data_dir: str) -> dict:
    from moray.platform.config import load_config
    from moray.platform.controller import run_pretraining

    with tempfile.TemporaryDirectory() as runs:
        cfg = load_config(ROOT / "configs/tiny.yaml", [
            f"train.runs_dir={runs}", "train.run_name=recovery", f"data.dir={data_dir}",
            f"train.max_steps={steps}", "train.checkpoint_every=2", "train.warmup_steps=2",
            "parallel.pp=2", "parallel.ep=1", "cluster.num_workers=2",
            f"train.chaos.kill_worker_at_step={kill_at}", "train.chaos.kill_rank=1"])
        result = run_pretraining(cfg)
    ev = result.events
    killed = next(e for e in ev if e["event"] == "chaos")
    failure = next(e for e in ev if e["event"] == "failure" and e["time"] >= killed["time"])
    restart = next(e for e in ev if e["event"] == "restart")
    after = [m for m in result.metrics if m["time"] > restart["time"]]
    caught_up = next(m for m in after if m["step"] == kill_at)
    normal = sorted(m["step_seconds"] for m in result.metrics if m["time"] < killed["time"] and m["step"] > 0)
    return {
        "detection_s": failure["time"] - killed["time"],
        "restart_s": restart["time"] - restart["load_seconds"] - failure["time"],
        "load_s": restart["load_seconds"],
        "catch_up_s": caught_up["time"] - restart["time"],
        "failure_to_first_step_s": after[0]["time"] - killed["time"],
        "failure_to_caught_up_s": caught_up["time"] - killed["time"],
        "steps_lost": restart["steps_lost"],
        "step_s_median": normal[len(normal) // 2],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kill-at", type=int, default=7)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()

    r = measure(args.kill_at, args.steps, str(ROOT / "data" / "demo"))  # run_pretraining prepares the data
    stall_file = ROOT / "bench/results/checkpoint_stall.json"
    stall = json.loads(stall_file.read_text()) if stall_file.exists() else None

    print(f"\nrecovery from a killed worker (tiny model, pp 2, local Ray cluster, kill at step {args.kill_at})")
    print(f"  {'phase':<28}{'seconds':>9}")
    for key, label in [("detection_s", "detection"), ("restart_s", "restart (new worker group)"),
                       ("load_s", "checkpoint load"), ("catch_up_s", "catch-up (redo lost steps)"),
                       ("failure_to_first_step_s", "failure -> first step"),
                       ("failure_to_caught_up_s", "failure -> caught up")]:
        print(f"  {label:<28}{r[key]:>9.2f}")
    print(f"  steps lost: {r['steps_lost']} (checkpoint every 2); a normal step: {r['step_s_median']:.3f} s")
    if stall:
        rows = {row["mode"]: row["stall_s"] for row in stall["rows"]}
        print(f"  checkpoint stall for {stall['state_mib']:.0f} MiB (bench/checkpoint_stall.py): "
              f"sync {rows['sync']:.3f} s, async {rows['async']:.3f} s ({rows['sync'] / rows['async']:.1f}x less)")
    out = ROOT / "bench/results/recovery.json"
    out.write_text(json.dumps({"summary": r, "checkpoint_stall": stall,
                               "setup": {"kill_at": args.kill_at, "steps": args.steps, "layout": "pp2",
                                         "machine": "2 CPU cores, local Ray cluster"}}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
