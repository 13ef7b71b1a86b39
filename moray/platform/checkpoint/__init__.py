"""The checkpoint store: sharded (torch.distributed.checkpoint), written in the background,
committed atomically to a local path or a pyarrow.fs URI, verified on load.

    store = CheckpointStore("runs/x/checkpoints", keep=3, rank=r, world_size=w)
    store.save(step, state, extra={...}, rank_extra={...})   # every rank; returns at once
    store.poll()                                             # every rank, each step: commits when done
    res = store.load(template)                               # every rank; fills template in place

`store.py` has the protocol, `manifest.py` the on-disk format, `fs.py` the storage.
No Ray here: it runs inside Ray Train workers and in a bare process alike.
"""

from moray.platform.checkpoint.manifest import verify_checkpoint
from moray.platform.checkpoint.records import (
    CheckpointEntry,
    CheckpointError,
    CommitInfo,
    LoadResult,
    NoCheckpointError,
    SaveHandle,
)
from moray.platform.checkpoint.store import PHASES, CheckpointStore

__all__ = [
    "PHASES",
    "CheckpointEntry",
    "CheckpointError",
    "CheckpointStore",
    "CommitInfo",
    "LoadResult",
    "NoCheckpointError",
    "SaveHandle",
    "verify_checkpoint",
]
