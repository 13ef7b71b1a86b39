"""Where a worker group starts: made once, by rank 0, and broadcast to every rank.

A submission (one `Controller.fit`, one `submit_id`) asks for `--resume auto`,
`never`, or a checkpoint (a path or a step). Ray Train restarts the group after
a failure; the restarted group must go on from the newest checkpoint *this
submission* committed, and, until it committed one, do exactly what was asked:
a retry of `--resume 4` before the first new commit loads step 4 again (not the
run's newest), and a retry of a resume from another run's checkpoint loads that
checkpoint again (not step 0).

Ray Train hands every rank the last checkpoint reported to it
(`ray.train.get_checkpoint()`), including one a previous submission of the same
run reported. Which submission committed it is read from the checkpoint's own
`extra.json` (`submit_id`), never from a file on one node's local disk.
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


def submission_of(checkpoint_dir: str) -> Optional[str]:
    """The submit_id recorded in a committed checkpoint's extra.json (None if it has none)."""
    try:
        return json.loads(cfs.get_bytes(cfs.resolve(checkpoint_dir).child(mf.EXTRA))).get("submit_id")
    except (OSError, ValueError):
        return None


def decide(requested: str, submit_id: Optional[str], reported: Optional[str], store) -> ResumeDecision:
    """Rank 0: this attempt's starting point (see the module doc)."""
    if reported is not None:
        ckpt = checkpoint_dir_of(reported)
        if submit_id is not None and submission_of(ckpt) == submit_id:
            return ResumeDecision(ckpt, f"this submission's last checkpoint reported to Ray Train ({ckpt})")
    if requested == "never":
        return ResumeDecision(None, "--resume never")
    if requested == "auto":
        step = store.latest_step()
        if step is None:
            return ResumeDecision(None, "--resume auto: no committed checkpoint yet")
        return ResumeDecision("latest", f"--resume auto: the newest committed checkpoint (step {step})")
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
