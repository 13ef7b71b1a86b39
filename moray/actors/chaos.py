"""Fault injection for tests and drills (`train.chaos`). Inert unless a field is set.

Each fault fires once per run by default: a marker file in the run directory
remembers that it fired, so the restarted group goes on instead of dying again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional


class Chaos:
    def __init__(self, chaos_cfg, run_path: Path, rank: int):
        self.cfg = chaos_cfg
        self.run_path = Path(run_path)
        self.rank = rank

    def _should(self, kind: str, at_step: Optional[int], step: int, rank: int) -> bool:
        if at_step is None or step != at_step or self.rank != rank:
            return False
        marker = self.run_path / f".chaos_{kind}_{at_step}"
        if self.cfg.once and marker.exists():
            return False
        marker.write_text(str(time.time()))
        return True

    def before_step(self, step: int, record_event) -> None:
        c = self.cfg
        if self._should("kill", c.kill_worker_at_step, step, c.kill_rank):
            record_event("chaos", what="kill_worker", rank=self.rank, step=step)
            os._exit(137)  # as if the kernel's OOM killer took it
        if self._should("raise", c.raise_at_step, step, c.raise_rank):
            record_event("chaos", what="raise", rank=self.rank, step=step)
            raise RuntimeError(f"chaos: an error injected before step {step} (train.chaos.raise_at_step)")
        if self._should("hang", c.hang_at_step, step, c.hang_rank):
            record_event("chaos", what="hang", rank=self.rank, step=step)
            while True:  # stuck as a worker in a collective would be; the watchdog ends it
                time.sleep(3600)

    def poison_loss(self, step: int) -> bool:
        """True if this step's loss must be made NaN (every rank agrees: no marker per rank)."""
        c = self.cfg
        if c.nan_at_step is None or step != c.nan_at_step:
            return False
        marker = self.run_path / f".chaos_nan_{step}_rank{self.rank}"
        if c.once and marker.exists():
            return False
        marker.write_text(str(time.time()))
        return True

    def checkpoint_hook(self, step: int, record_event):
        """A crash_hook for the checkpoint store: dies between writing shards and committing."""
        c = self.cfg
        if c.crash_during_checkpoint_at_step is None:
            return None

        def hook(phase: str) -> None:
            if phase == "shards_written" and self._should("ckpt", c.crash_during_checkpoint_at_step, step, 0):
                record_event("chaos", what="crash_during_checkpoint", rank=self.rank, step=step, phase=phase)
                os._exit(137)

        return hook
