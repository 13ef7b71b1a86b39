"""The run directory: config.yaml, metrics.jsonl, events.jsonl and loss.png.

Lines are appended and flushed one at a time, so a crash loses at most the
line being written; readers skip a torn last line.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional


class RunDir:
    def __init__(self, runs_dir: str, run_name: str):
        self.path = Path(runs_dir).expanduser().resolve() / run_name
        self.path.mkdir(parents=True, exist_ok=True)

    @classmethod
    def at(cls, path: str) -> "RunDir":
        p = Path(path)
        return cls(str(p.parent), p.name)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def checkpoints(self) -> str:
        return str(self.path / "checkpoints")

    def event(self, kind: str, **fields: Any) -> Dict[str, Any]:
        """Record what happened, where and when (start, checkpoint, failure, restart, finish...)."""
        rec = {"event": kind, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid(), **fields}
        _append(self.events_path, rec)
        return rec

    def metrics(self, rec: Dict[str, Any]) -> None:
        _append(self.metrics_path, rec)

    def read_metrics(self) -> List[Dict[str, Any]]:
        return list(read_jsonl(self.metrics_path))

    def read_events(self) -> List[Dict[str, Any]]:
        return list(read_jsonl(self.events_path))

    def archive(self) -> Optional[Path]:
        """Move a previous run's files aside (for --resume never): a fresh start loses nothing."""
        old = [p for p in self.path.iterdir() if not p.name.startswith("archive-")]
        if not old:
            return None
        dest = self.path / time.strftime("archive-%Y%m%d-%H%M%S")
        dest.mkdir()
        for p in old:
            p.rename(dest / p.name)
        return dest

    def run_id(self) -> str:
        """This run's id, made on its first submission and kept by every later one (and by
        --resume never's archive, which starts a new run): it names the run's checkpoint
        temporaries and holds its storage lease. Called by the driver, which hands it on."""
        path = self.path / "run_id"
        if not path.exists():
            name = re.sub(r"[^A-Za-z0-9_.-]", "-", self.path.name)[:40]  # it becomes part of file names
            path.write_text(f"{name}-{uuid.uuid4().hex[:12]}\n")
        return path.read_text().strip()

    def last_logged_step(self) -> Optional[int]:
        steps = [m["step"] for m in read_jsonl(self.metrics_path) if "step" in m]
        return max(steps) if steps else None


def _append(path: Path, rec: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=_jsonable) + "\n")
        f.flush()


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def read_jsonl(path: Path) -> Iterator[Dict[str, Any]]:
    if not Path(path).exists():
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash


def plot_loss(metrics: List[Dict[str, Any]], out: Path, title: str = "") -> Optional[Path]:
    """loss.png: training loss per step (the last attempt's value where steps were redone
    after a restart), with the router's load-balancing loss and expert shares beside it."""
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {m["step"]: m for m in metrics if "loss" in m}
    steps = sorted(by_step)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    ax.plot(steps, [by_step[s]["loss"] for s in steps], lw=1, label="loss (cross-entropy)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    share = [by_step[s].get("expert_share") for s in steps]
    ax2 = axes[1]
    if share and share[-1]:
        import numpy as np

        arr = np.array([s for s in share if s])
        for e in range(arr.shape[1]):
            ax2.plot(steps[-len(arr):], arr[:, e], lw=1, label=f"expert {e}")
        ax2.axhline(1.0 / arr.shape[1], color="k", ls="--", lw=0.8, label="uniform")
        ax2.set_title("share of routed tokens per expert")
        ax2.set_xlabel("step")
        ax2.legend(fontsize=7, ncol=2)
    else:
        ax2.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
