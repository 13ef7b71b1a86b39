"""The plan's goodput section: what failures, checkpoints and restarts cost a run.

Failure rate: Llama 3's 419 unexpected interruptions in 54 days on 16,384
GPUs, per GPU-hour (override --failures-per-gpu-hour). Checkpoint stall: the
bytes one GPU saves (its weights and its optimizer shard, from the memory
section) over the host-copy bandwidth (async save: training waits only for
the copy to host memory) or over the storage bandwidth (sync save). Recovery:
detection + restart as moray measured them (bench/results/recovery.json, from
bench/recovery.py) + reading the checkpoint back. Every term is a flag.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

from moray.platform.goodput import FAILURES_PER_GPU_HOUR, GoodputInputs, closed_form, simulate
from moray.platform.planner.errors import PlanError
from moray.platform.planner.plan import PlanRequest, needs

RESULTS = Path(__file__).resolve().parents[3] / "bench" / "results" / "recovery.json"
HOST_COPY_GBS = 20.0  # device -> pinned host memory per GPU, PCIe gen4 x16 in practice
STORAGE_WRITE_GBS = 1.0  # per GPU to a parallel file system / object store (sync save)
STORAGE_READ_GBS = 2.0  # per GPU, on restart
FALLBACK_DETECT_S, FALLBACK_RESTART_S = 10.0, 60.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("goodput (failures and checkpoints)")
    g.add_argument("--failures-per-gpu-hour", type=float, default=FAILURES_PER_GPU_HOUR,
                   help=f"default {FAILURES_PER_GPU_HOUR:.3g}: Llama 3's 419 interruptions / 54 days / 16,384 GPUs")
    g.add_argument("--checkpoint-stall-s", type=float, help="training stall per checkpoint (default: bytes per "
                   f"GPU / {HOST_COPY_GBS:g} GB/s host copy, async save)")
    g.add_argument("--sync-checkpoint", action="store_true",
                   help=f"save synchronously: the stall is bytes per GPU / {STORAGE_WRITE_GBS:g} GB/s storage")
    g.add_argument("--recovery-s", type=float, help="failure to training again (default: moray's measured "
                   "detection + restart, plus the checkpoint read)")
    g.add_argument("--checkpoint-interval-s", type=float, help="default: the Young-Daly optimum")
    g.add_argument("--simulate-trials", type=int, default=40, help="Monte Carlo runs (0 = closed form only)")


def measured_recovery() -> Dict[str, float]:
    """moray's own detection and restart seconds, as bench/recovery.py last measured them."""
    try:
        r = json.loads(RESULTS.read_text())["summary"]
        return {"detect_s": float(r["detection_s"]), "restart_s": float(r["restart_s"]), "source": str(RESULTS.name)}
    except (OSError, KeyError, ValueError):
        return {"detect_s": FALLBACK_DETECT_S, "restart_s": FALLBACK_RESTART_S, "source": "assumed"}


def build(r: PlanRequest, done: Dict[str, dict]) -> dict:
    o = r.options
    mem, t = needs(done, "memory"), needs(done, "training")
    if mem["chosen"] is None:
        raise PlanError("no training layout fits this cluster (see Memory), so there is no run to fail")
    ckpt_bytes = mem["weights_bytes"] + mem["optimizer_bytes"]
    sync = bool(o.get("sync_checkpoint"))
    stall = o.get("checkpoint_stall_s")
    if stall is None:
        stall = ckpt_bytes / ((STORAGE_WRITE_GBS if sync else HOST_COPY_GBS) * 1e9)
    rec = measured_recovery()
    load_s = ckpt_bytes / (STORAGE_READ_GBS * 1e9)
    recovery = o.get("recovery_s")
    if recovery is None:
        recovery = rec["detect_s"] + rec["restart_s"] + load_s
    x = GoodputInputs(gpus=t["gpus"], run_days=t["days"], checkpoint_stall_s=stall, recovery_s=recovery,
                      failures_per_gpu_hour=o.get("failures_per_gpu_hour") or FAILURES_PER_GPU_HOUR,
                      interval_s=o.get("checkpoint_interval_s"))
    cf = closed_form(x)
    trials = o.get("simulate_trials", 40)
    mc = simulate(x, trials=trials) if trials else None
    return {
        "gpus": t["gpus"], "failures_per_gpu_hour": x.failures_per_gpu_hour, "mtbf_hours": cf.mtbf_hours,
        "checkpoint_bytes_per_gpu": ckpt_bytes, "checkpoint_save": "sync" if sync else "async",
        "checkpoint_stall_s": stall, "checkpoint_interval_s": cf.interval_s,
        "recovery_s": recovery, "recovery_detect_s": rec["detect_s"], "recovery_restart_s": rec["restart_s"],
        "recovery_load_s": load_s, "recovery_source": rec["source"] if o.get("recovery_s") is None else "--recovery-s",
        "expected_failures": cf.expected_failures,
        "lost_to_saving": cf.lost_to_saving, "lost_to_recompute": cf.lost_to_recompute,
        "lost_to_restart": cf.lost_to_restart, "goodput": cf.goodput,
        "mfu_assumed": r.mfu, "effective_mfu": r.mfu * cf.goodput,
        "failure_free_days": t["days"], "wall_days": cf.wall_days,
        "simulated_goodput": mc.goodput if mc else None, "simulated_wall_days": mc.wall_days if mc else None,
        "simulation_trials": trials,
    }


def render(s: dict) -> List[str]:
    pct = lambda v: f"{100 * v:.1f}%"
    from moray.platform.planner.report import heading

    lines = heading(f"Goodput: failures, checkpoints and restarts on {s['gpus']:,} GPUs") + [
        f"  failures            one every {s['mtbf_hours']:.2f} h on {s['gpus']:,} GPUs "
        f"({s['failures_per_gpu_hour']:.3g} per GPU-hour); {s['expected_failures']:,.0f} over the run",
        f"  checkpoint          {s['checkpoint_bytes_per_gpu'] / 2**30:.2f} GiB per GPU, {s['checkpoint_save']} save: "
        f"stall {s['checkpoint_stall_s']:.1f} s, every {s['checkpoint_interval_s'] / 60:.1f} min (Young-Daly)",
        f"  recovery            {s['recovery_s']:.0f} s (--recovery-s)" if s["recovery_source"] == "--recovery-s" else
        f"  recovery            {s['recovery_s']:.0f} s = detect {s['recovery_detect_s']:.0f} + restart "
        f"{s['recovery_restart_s']:.0f} + load {s['recovery_load_s']:.0f} ({s['recovery_source']})",
        f"  time lost           saving {pct(s['lost_to_saving'])}, recomputing {pct(s['lost_to_recompute'])}, "
        f"restarting {pct(s['lost_to_restart'])}",
        f"  goodput             {pct(s['goodput'])} (closed form)"
        + (f", {pct(s['simulated_goodput'])} simulated over {s['simulation_trials']} runs"
           if s["simulated_goodput"] is not None else ""),
        f"  effective MFU       {pct(s['effective_mfu'])} = {pct(s['mfu_assumed'])} x goodput; "
        f"{s['failure_free_days']:.1f} days without failures become {s['wall_days']:.1f}",
    ]
    return lines
