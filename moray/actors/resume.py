"""Where a worker group starts: made once, by rank 0, and broadcast to every rank.

A submission (one `Controller.fit`, one `submit_id`) asks for `--resume auto`,
`never`, or a checkpoint (a path or a step). Ray Train restarts the group after
a failure; the restarted group must go on from the newest checkpoint *this
submission* committed, and, until it committed one, do exactly what was asked:
a retry of `--resume 4` before the first new commit loads step 4 again (not the
run's newest), and a retry of a resume from another run's checkpoint loads that
checkpoint again (not step 0).

Which submission committed a checkpoint is read from its own `extra.json`
(`submit_id`) on the checkpoint storage, never from a file on one node's local
disk. The store's newest checkpoint is looked at first, then the one Ray Train
hands every rank (`ray.train.get_checkpoint()`: the last reported to it, which
may be a previous submission's, restored from its snapshot): a worker can die
after a commit and before Ray Train took in its report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Union

import torch.distributed as dist

from moray.actors.errors import NonRetryableError
from moray.platform.checkpoint import fs as cfs
from moray.platform.checkpoint import manifest as mf

POINTER = "moray_checkpoint.json"  # a reported checkpoint that names one stored elsewhere


@dataclass(frozen=True)
class ResumeDecision:
    target: Union[None, str, int]  # None: start fresh; "latest": the store's newest loadable; else a path or a step
    why: str

    @property
    def fresh(self) -> bool:
        return self.target is None


def checkpoint_dir_of(reported: str) -> str:
    """The moray checkpoint behind what was reported to Ray Train: itself, or what its pointer names."""
    loc = cfs.resolve(reported)
    pointer = loc.child(POINTER)
    if cfs.exists(pointer):
        return json.loads(cfs.get_bytes(pointer))["path"]
    return reported


def submission_of(checkpoint_dir) -> Optional[str]:
    """The submit_id recorded in a committed checkpoint's extra.json (None if it has none).
    `checkpoint_dir`: a path or URI, or a location in the store's filesystem."""
    loc = checkpoint_dir if isinstance(checkpoint_dir, cfs.Location) else cfs.resolve(checkpoint_dir)
    try:
        return json.loads(cfs.get_bytes(loc.child(mf.EXTRA))).get("submit_id")
    except (OSError, ValueError):
        return None


def decide(requested: str, submit_id: Optional[str], reported: Optional[str], store) -> ResumeDecision:
    """Rank 0: this attempt's starting point (see the module doc). The store's newest checkpoint
    comes first: a worker may die after a commit and before Ray Train took in its report."""
    latest = store.latest_step()
    if submit_id is not None and latest is not None and \
            submission_of(store.root.child(mf.checkpoint_name(latest))) == submit_id:
        return ResumeDecision("latest", f"this submission's newest committed checkpoint (step {latest})")
    if reported is not None:
        ckpt = checkpoint_dir_of(reported)
        if submit_id is not None and submission_of(ckpt) == submit_id:
            return ResumeDecision(ckpt, f"this submission's last checkpoint reported to Ray Train ({ckpt})")
    if requested == "never":
        return ResumeDecision(None, "--resume never")
    if requested == "auto":
        if latest is None:
            return ResumeDecision(None, "--resume auto: no committed checkpoint yet")
        return ResumeDecision("latest", f"--resume auto: the newest committed checkpoint (step {latest})")
    target: Union[str, int] = int(requested) if requested.isdigit() else requested
    return ResumeDecision(target, f"--resume {requested}")


def agree(decision_on_rank0, rank: int) -> ResumeDecision:
    """Rank 0 decides (a callable), every rank gets its answer; an error there stops every rank
    (storage that did not answer may answer on the next attempt; anything else would not)."""
    box = [None]
    if rank == 0:
        try:
            box[0] = decision_on_rank0()
        except Exception as err:  # every rank must leave the broadcast, with the same error
            box[0] = (isinstance(err, OSError), f"{type(err).__name__}: {err}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], tuple):
        transient, text = box[0]
        raise (RuntimeError if transient else NonRetryableError)(f"choosing where to resume failed: {text}")
    return box[0]
