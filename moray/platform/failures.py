"""Records failures in events.jsonl as Ray Train sees them.

This callback runs in Ray Train's controller actor, which outlives the
workers: the only place that can write down that a worker or a node died.
The restart itself (which checkpoint, how many steps were lost) is recorded
by rank 0 of the new group when it resumes.
"""

from __future__ import annotations

from typing import Dict

from ray.train import UserCallback

from moray.platform.runlog import RunDir


def classify(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
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


class FailureEvents(UserCallback):
    def __init__(self, run_path: str):
        self.run_path = run_path

    def after_exception(self, run_context, worker_exceptions: Dict[int, Exception]) -> None:
        run = RunDir.at(self.run_path)
        for rank, exc in sorted(worker_exceptions.items()):
            run.event("failure", what=classify(exc), rank=rank, error=f"{type(exc).__name__}: {str(exc)[:1500]}")

