"""What a user watching a run sees: one line per logged step with an ETA, one
line per event worth knowing about, and one summary at the end.

Steps are shown as counts of finished steps ("step 12/300" = 12 done), the
numbering checkpoints use (step_0000050 holds 50 steps); metrics.jsonl's
`step` is the 0-based index of the step, so its record N-1 is line N.

Everything is written to a stream passed in (default sys.stdout) and flushed
per line: inside a Ray Train worker `print` is patched to also log, which
shows each line twice, so the worker must not print.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple


def duration(seconds: float) -> str:
    """42s, 3m12s, 2h05m, 3d04h: two units at most, the coarser ones once they matter."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class StepLine:
    """Formats step lines and estimates the time left from the wall time between them.

    The ETA is the mean time per step over the last `window` intervals, so a checkpoint or a
    slow data shard moves it only a little and briefly. Time before the first line (model
    set-up, resuming) never counts, and the first `skip` intervals after it are left out too:
    the first steps of an attempt also pay for allocator warm-up and kernel autotuning.
    """

    def __init__(self, max_steps: int, clock: Callable[[], float] = time.monotonic, window: int = 20,
                 skip: int = 1):
        self.max_steps, self.clock, self.skip = max_steps, clock, skip
        self._width = len(str(max_steps))
        self._recent: deque = deque(maxlen=window)  # (seconds, steps) per interval
        self._last: Optional[tuple] = None  # (steps done, clock) at the previous line
        self._intervals = 0

    def seconds_per_step(self) -> Optional[float]:
        if not self._recent:
            return None
        return sum(s for s, _ in self._recent) / sum(n for _, n in self._recent)

    def eta(self, done: int) -> Optional[float]:
        per = self.seconds_per_step()
        return None if per is None else per * max(0, self.max_steps - done)

    def format(self, rec: Dict[str, Any]) -> str:
        """The line for a metrics.jsonl record; call it once per step (or per logged step)."""
        done, now = rec["step"] + 1, self.clock()
        if self._last is not None and done > self._last[0]:
            self._intervals += 1
            if self._intervals > self.skip:
                self._recent.append((now - self._last[1], done - self._last[0]))
        self._last = (done, now)
        parts = [f"step {done:>{self._width}}/{self.max_steps}", f"loss {rec['loss']:.4f}"]
        if rec.get("aux_loss") is not None:  # None for a dense model
            parts.append(f"aux {rec['aux_loss']:.3f}")
        parts += [f"lr {rec['lr']:.2e}", f"{rec['tokens_per_s']:,.0f} tok/s"]
        if rec.get("mfu") is not None:
            parts.append(f"mfu {rec['mfu']:.1%}")
        eta = self.eta(done)
        parts.append(f"eta {duration(eta)}" if eta is not None else "eta --")
        if rec.get("skipped"):
            parts.append("skipped (non-finite)")
        return " | ".join(parts)


def _layout(d: Optional[Dict[str, Any]]) -> str:
    return " ".join(f"{k}={d[k]}" for k in ("pp", "dp", "tp", "ep", "etp") if d and k in d)


def _first_line(text: Any, limit: int = 200) -> str:
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


# The events worth a line: kind -> (label, text). Left out: finish (the summary follows),
# gave_up (RunFailed's message says it), memory (one per rank; it is in events.jsonl).
_EVENTS: Dict[str, Tuple[str, Callable[[Dict[str, Any]], str]]] = {
    "submit": ("submit", lambda e: f"{e.get('world_size')} workers ({_layout(e.get('layout'))}), "
                                   f"resume={e.get('resume')}; starting them"),
    "start": ("start", lambda e: f"fresh start on {e.get('world_size')} workers ({_layout(e.get('layout'))})"),
    "restart": ("restart", lambda e: f"resumed at step {e['step']} from {e.get('checkpoint')} (loaded in "
                                     f"{e.get('load_seconds', 0):.1f}s, {e.get('steps_lost', 0)} steps to redo)"),
    "checkpoint": ("checkpoint", lambda e: f"step {e['step']} saved to {e.get('path')} ({e.get('seconds', 0):.1f}s, "
                                           f"training stalled {e.get('stall_s', 0):.2f}s)"),
    "checkpoint_skipped": ("checkpoint", lambda e: f"skipped {e.get('path')}: {e.get('reason')}"),
    "failure": ("failure", lambda e: f"rank {e.get('rank')} {e.get('what')}: {_first_line(e.get('error'))}"),
    "hang": ("hang", lambda e: f"rank {e.get('rank')}: no step finished for {duration(e.get('stalled_s', 0))} "
                               + (f"after step {e['step']}" if e.get("step") is not None else "before the first step")
                               + f" (train.hang_timeout_s={e.get('timeout_s')}); ending it so the group restarts"),
    # halt, nan and step_skipped carry the 0-based index of the step that failed: line N is index N-1.
    "halt": ("halt", lambda e: f"step {e['step'] + 1}: loss {e.get('loss')}; {e.get('reason')}"),
    "nan": ("nan", lambda e: f"step {e['step'] + 1}: loss {e.get('loss')}; restarting from the last checkpoint "
                             f"(train.on_nan=restart)"),
    "step_skipped": ("skipped", lambda e: f"step {e['step'] + 1}: {e.get('reason')} (loss {e.get('loss')}); "
                                          f"weights unchanged"),
    # chaos names its step as train.chaos does, so a drill's line matches its config.
    "chaos": ("chaos", lambda e: f"injected {e.get('what')} on rank {e.get('rank')} at step {e.get('step')}"
                                 + (f", {e['phase']}" if e.get("phase") else "") + " (train.chaos)"),
}
_WIDTH = max(len(label) for label, _ in _EVENTS.values())


def event_line(kind: str, fields: Dict[str, Any]) -> Optional[str]:
    """One line for an events.jsonl record worth showing, else None."""
    if kind not in _EVENTS:
        return None
    label, text = _EVENTS[kind]
    return f"{label:<{_WIDTH}} | {text(fields)}"


class Console:
    """Writes step and event lines to a stream as they happen."""

    def __init__(self, max_steps: int, log_every: int = 1, stream: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.steps = StepLine(max_steps, clock=clock)
        self.log_every = log_every
        self.stream = stream if stream is not None else sys.stdout

    def write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def step(self, rec: Dict[str, Any]) -> None:
        """Call with every step's metrics.jsonl record: each feeds the ETA; every log_every-th
        step and the last one are written."""
        line = self.steps.format(rec)
        if rec["step"] % self.log_every == 0 or rec["step"] + 1 == self.steps.max_steps:
            self.write(line)

    def event(self, rec: Dict[str, Any]) -> None:
        """Call with the dict RunDir.event returned."""
        line = event_line(rec["event"], rec)
        if line is not None:
            self.write(line)


def run_summary(metrics: List[Dict[str, Any]], events: List[Dict[str, Any]], run_dir: Path,
                loss_png: Optional[Path] = None, max_steps: Optional[int] = None) -> str:
    """The end of a run in a few lines: how far it got, how it went, where everything is.

    Counts (restarts, failures, hangs) and the wall time cover this job, i.e. the events since
    the last submit; steps, loss and tokens cover the whole run, which may span several jobs.
    """
    run_dir = Path(run_dir)
    submits = [i for i, e in enumerate(events) if e.get("event") == "submit"]
    job = events[submits[-1]:] if submits else events
    kinds = [e.get("event") for e in job]
    by_step = {m["step"]: m for m in metrics if "step" in m}  # a redone step: its last value
    done = max(by_step) + 1 if by_step else 0

    status = next((word for kind, word in (("halt", "halted"), ("gave_up", "gave up"), ("finish", "finished"))
                   if kind in kinds), "stopped")
    head = f"run {run_dir.name!r} {status} at step {done}" + (f"/{max_steps}" if max_steps else "")
    times = [r["time"] for r in job + metrics if "time" in r]
    start = job[0]["time"] if job and "time" in job[0] else min(times, default=None)
    if start is not None:
        head += f" in {duration(max(times) - start)}"
    lines = [head]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<11} {text}")

    if by_step:
        first, last = by_step[min(by_step)], by_step[max(by_step)]
        row("loss", f"{first['loss']:.4f} -> {last['loss']:.4f}")
        if last.get("tokens_seen") is not None:
            row("tokens", f"{last['tokens_seen']:,}")
    groups = kinds.count("start") + kinds.count("restart")
    failures = [e for e in job if e.get("event") == "failure"]
    redone = sum(e.get("steps_lost", 0) for e in job if e.get("event") == "restart")
    what = sorted({e.get("what", "?") for e in failures})
    row("restarts", f"{max(0, groups - 1)}"
        + (f" after {len(failures)} failure(s): {', '.join(what)}" if failures else "")
        + (f"; {redone} steps redone" if redone else ""))
    for kind, label in (("hang", "hangs"), ("step_skipped", "skipped")):
        if kind in kinds:
            row(label, str(kinds.count(kind)))
    ckpts = [e for e in events if e.get("event") == "checkpoint"]
    row("checkpoint", f"step {ckpts[-1]['step']}: {ckpts[-1].get('path')}" if ckpts else "none committed")
    row("run dir", str(run_dir))
    row("metrics", str(run_dir / "metrics.jsonl"))
    row("events", str(run_dir / "events.jsonl"))
    if loss_png is not None:
        row("loss plot", str(loss_png))
    if (run_dir / "tensorboard").is_dir():
        row("tensorboard", f"tensorboard --logdir {run_dir / 'tensorboard'}")
    if (run_dir / "mlflow.db").exists():
        row("mlflow", f"mlflow ui --backend-store-uri sqlite:///{run_dir / 'mlflow.db'}")
    return "\n".join(lines)
