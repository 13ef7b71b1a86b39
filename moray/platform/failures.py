"""Records failures in events.jsonl as Ray Train sees them, and stops the run
when retrying cannot help.

This callback runs in Ray Train's controller actor, which outlives the
workers: the only place that can write down that a worker or a node died.
The restart itself (which checkpoint, how many steps were lost) is recorded
by rank 0 of the new group when it resumes.

Ray Train retries every worker error up to `max_failures` times. Two kinds
would fail the same way on every attempt, so the callback ends the run at once
(an exception raised here fails Ray Train's controller, which never retries):
a worker's `NonRetryableError` (a bad config or layout, a missing resume
target), and the same error from the same rank twice in a row with no
checkpoint reported in between (a bug that the restored state hits again).
Lost workers, nodes and peers are never counted as either.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from ray.train import UserCallback

from moray.actors.errors import MARKER
from moray.platform.console import event_line
from moray.platform.runlog import RunDir

INFRASTRUCTURE = ("worker_lost", "peer_lost", "node_lost", "worker_died")


class RunStopped(RuntimeError):
    """Raised inside Ray Train's controller to stop retrying; the driver explains it."""


def classify(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if MARKER in text:
        return "fatal"
    if "HealthCheck" in text or "unavailable" in text.lower():
        return "worker_lost"  # its process or its whole node stopped answering
    if any(k in text for k in ("gloo", "NCCL", "Connection closed by peer", "Read error")):
        return "peer_lost"  # this rank survived, but a peer in its collective went away
    if "ActorDied" in text or "died" in text.lower() or "exit" in text.lower():
        if "node" in text.lower():
            return "node_lost"
        return "worker_died"
    if "FloatingPointError" in text:
        return "nan_loss"
    return "exception"


def last_line(exc: BaseException) -> str:
    """The `Type: message` line a traceback ends with (Ray wraps worker errors in their traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:500] if lines else type(exc).__name__


class FailureEvents(UserCallback):
    def __init__(self, run_path: str, submit_id: Optional[str] = None):
        self.run_path, self.submit_id = run_path, submit_id
        self._last: Optional[Tuple] = None  # the previous attempt's error signature

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is not None:
            self._last = None  # progress was made: a repeat after this is a new failure

    def after_exception(self, run_context, worker_exceptions: Dict[int, Exception]) -> None:
        run = RunDir.at(self.run_path)
        kinds = {}
        for rank, exc in sorted(worker_exceptions.items()):
            kinds[rank] = what = classify(exc)
            rec = run.event("failure", what=what, rank=rank, error=f"{type(exc).__name__}: {str(exc)[:1500]}")
            print(event_line("failure", rec), flush=True)  # Ray forwards the controller's output to the driver
        fatal = [(r, last_line(e)) for r, e in sorted(worker_exceptions.items()) if kinds[r] == "fatal"]
        if not fatal:
            errors = tuple((r, last_line(e)) for r, e in sorted(worker_exceptions.items())
                           if kinds[r] not in INFRASTRUCTURE)
            repeated = bool(errors) and errors == self._last
            self._last = errors or None
            if not repeated:
                return  # Ray Train restarts the group from the last committed checkpoint
            fatal = [(r, f"{line} (the same error as the previous attempt, with no checkpoint in between)")
                     for r, line in errors]
        rank, line = fatal[0]
        run.event("fatal", rank=rank, error=line, submit_id=self.submit_id)
        raise RunStopped(f"rank {rank}: {line}")
