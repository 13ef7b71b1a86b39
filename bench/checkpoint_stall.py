"""How long a checkpoint stalls training: asynchronous save against synchronous save.

One process, a model-sized state (parameters + AdamW's two moments, `--mb` in all),
saved `--repeats` times per mode into a local directory while a stand-in training
loop runs. The stall is what the training loop waits for: `save()` itself, plus the
commit that a later `poll()` runs (gather, manifest, rename, `latest`). For the
asynchronous mode the stall should be about one host-memory copy of the state
(`copy` column), and the write happens behind the training steps.

    python bench/checkpoint_stall.py [--mb 128] [--repeats 3] [--root DIR]

Prints a table and writes bench/results/checkpoint_stall.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from moray.platform.checkpoint import CheckpointStore

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
RESULTS = Path(__file__).resolve().parent / "results" / "checkpoint_stall.json"


def model_sized_state(total_mb: int, tensors_per_group: int = 8) -> dict:
    """Parameters, exp_avg and exp_avg_sq of equal size, `total_mb` MiB together (fp32)."""
    numel = total_mb * 2**20 // 4 // 3 // tensors_per_group
    cols = 1024
    rows = max(1, numel // cols)
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(tensors_per_group):
        w = torch.randn(rows, cols, generator=g)
        state[f"model.layers.{i}.w"] = w
        state[f"optim.layers.{i}.w.exp_avg"] = torch.randn(rows, cols, generator=g) * 1e-3
        state[f"optim.layers.{i}.w.exp_avg_sq"] = torch.rand(rows, cols, generator=g) * 1e-6
    return state


def train_step(a: torch.Tensor, b: torch.Tensor) -> None:
    """A stand-in for a training step: some matrix work the background write overlaps."""
    for _ in range(4):
        a = torch.tanh(a @ b)


def host_copy_seconds(state: dict) -> float:
    began = time.perf_counter()
    copies = {k: v.detach().clone() for k, v in state.items()}
    del copies
    return time.perf_counter() - began


def run_mode(root: Path, state: dict, async_save: bool, repeats: int) -> dict:
    store = CheckpointStore(str(root), keep=2, async_save=async_save)
    a, b = torch.randn(256, 256), torch.randn(256, 256) / 16
    stalls, commits, totals, steps_behind = [], [], [], []
    for i in range(repeats):
        train_step(a, b)
        handle = store.save((i + 1) * 100, state, extra={"step": (i + 1) * 100})
        info, steps = handle.commit, 0
        while info is None:  # the training loop: a step, then a collective poll at its end
            train_step(a, b)
            steps += 1
            info = store.poll()
        stalls.append(info.stall_s + (info.commit_s if async_save else 0.0))
        commits.append(info.commit_s)
        totals.append(info.total_s)
        steps_behind.append(steps)
    store.close()
    return {
        "mode": "async" if async_save else "sync",
        "stall_s": statistics.median(stalls),
        "stall_s_all": stalls,
        "commit_s": statistics.median(commits),
        "save_to_commit_s": statistics.median(totals),
        "steps_during_write": statistics.median(steps_behind),
        "bytes": info.bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=128, help="state size in MiB (fp32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default=None, help="where to write (default: a temporary dir)")
    args = parser.parse_args()

    state = model_sized_state(args.mb)
    state_mb = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    copy_s = statistics.median(host_copy_seconds(state) for _ in range(3))
    base = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="moray-ckpt-bench-"))
    try:
        rows = [run_mode(base / mode, state, mode == "async", args.repeats) for mode in ("sync", "async")]
    finally:
        if args.root is None:
            shutil.rmtree(base, ignore_errors=True)

    print(f"state: {state_mb:.0f} MiB in {len(state)} tensors; host copy of it: {copy_s * 1e3:.0f} ms")
    header = ("mode", "stall ms", "commit ms", "save->commit ms", "write MiB/s", "steps overlapped")
    print(f"{header[0]:<6} {header[1]:>9} {header[2]:>10} {header[3]:>16} {header[4]:>12} {header[5]:>17}")
    for r in rows:
        mibps = r["bytes"] / 2**20 / r["save_to_commit_s"]
        print(f"{r['mode']:<6} {r['stall_s'] * 1e3:>9.0f} {r['commit_s'] * 1e3:>10.1f} "
              f"{r['save_to_commit_s'] * 1e3:>16.0f} {mibps:>12.0f} {r['steps_during_write']:>17.0f}")
    sync, async_ = rows
    print(f"async stalls training {sync['stall_s'] / async_['stall_s']:.1f}x less than sync")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "checkpoint_stall",
        "state_mib": state_mb,
        "tensors": len(state),
        "repeats": args.repeats,
        "host_copy_s": copy_s,
        "rows": rows,
        "stall_ratio_sync_over_async": sync["stall_s"] / async_["stall_s"],
        "machine": {"cpus": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "note": "stall = time the training loop is blocked per checkpoint; local disk, single process",
    }, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
