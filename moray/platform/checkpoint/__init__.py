"""The checkpoint store: sharded (torch.distributed.checkpoint), written in the background,
committed atomically to a local path or a pyarrow.fs URI, verified on load.

    lease = StorageLease("runs/x/checkpoints", run_id, run_name).acquire()   # the driver, once
    lease.start_heartbeat()
    store = CheckpointStore("runs/x/checkpoints", keep=3, rank=r, world_size=w, run_id=run_id)
    store.save(step, state, extra={...}, rank_extra={...})   # every rank; returns at once
    store.poll()                                             # every rank, each step: commits when done
    res = store.load(template)                               # every rank; fills template in place
    lease.release()                                          # the driver, at the end

`store.py` has the protocol, `manifest.py` the on-disk format, `fs.py` the storage,
`lease.py` the one-writer lease, `rng.py` RNG state as JSON for `rank_extra`.
No Ray here: it runs inside Ray Train workers and in a bare process alike.
"""

from moray.platform.checkpoint.lease import DEFAULT_TTL_S, LeaseHolder, StorageLease, read_lease
from moray.platform.checkpoint.manifest import verify_checkpoint
from moray.platform.checkpoint.records import (
    CheckpointEntry,
    CheckpointError,
    CommitInfo,
    LeaseHeldError,
    LoadResult,
    NoCheckpointError,
    SaveHandle,
)
from moray.platform.checkpoint.rng import rng_state_json, set_rng_state_json
from moray.platform.checkpoint.store import PHASES, CheckpointStore

__all__ = [
    "DEFAULT_TTL_S",
    "PHASES",
    "CheckpointEntry",
    "CheckpointError",
    "CheckpointStore",
    "CommitInfo",
    "LeaseHeldError",
    "LeaseHolder",
    "LoadResult",
    "NoCheckpointError",
    "SaveHandle",
    "StorageLease",
    "read_lease",
    "rng_state_json",
    "set_rng_state_json",
    "verify_checkpoint",
]
