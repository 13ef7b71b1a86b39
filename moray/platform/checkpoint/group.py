"""The few collectives the checkpoint store needs, on gloo groups of its own.

Two groups, both gloo (CPU), whatever the trainer's backend:
- `dcp`: handed to torch.distributed.checkpoint. An async save runs DCP's
  collectives (plan gather, metadata) in a background thread; sharing a group
  with the training loop would let the two threads' collectives interleave in a
  different order on different ranks and deadlock.
- `control`: the store's own agreement on the main thread (is every rank's
  write done, the commit's outcome, which checkpoint to load).

Creating them is collective over the default group (`dist.new_group`), so every
rank must construct its `CheckpointStore` at the same point. Without
torch.distributed (one process) every collective is the identity.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist

from moray.platform.checkpoint.records import CheckpointError, LeaseHeldError, NoCheckpointError

_KINDS = (CheckpointError, NoCheckpointError, LeaseHeldError)  # sent between ranks by index


class StoreGroup:
    def __init__(self, rank: int, world_size: int, process_group: Optional[Any] = None):
        self.rank, self.world_size = rank, world_size
        self.dcp = self.control = None
        if not (dist.is_available() and dist.is_initialized()):
            if world_size != 1 or rank != 0:
                raise ValueError(
                    f"rank {rank} of world_size {world_size} needs torch.distributed to be "
                    "initialised before the CheckpointStore is built"
                )
            return
        group = process_group if process_group is not None else dist.group.WORLD
        ranks = dist.get_process_group_ranks(group)
        if len(ranks) != world_size or dist.get_rank(group) != rank:
            raise ValueError(
                f"CheckpointStore(rank={rank}, world_size={world_size}) does not match its "
                f"process group (rank {dist.get_rank(group)} of {len(ranks)})"
            )
        self._src = ranks[0]
        self.dcp = dist.new_group(ranks, backend="gloo")
        self.control = dist.new_group(ranks, backend="gloo")

    @property
    def distributed(self) -> bool:
        return self.control is not None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self._src, group=self.control)
        return box[0]

    def all_gather(self, obj: Any) -> List[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def agree(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on every rank; return rank 0's result everywhere. If it raised on any
        rank, raise on every rank: the CheckpointError subclass it raised (NoCheckpointError,
        LeaseHeldError) if every failing rank raised the same one, else CheckpointError."""
        try:
            outcome, error = fn(), None
        except Exception as e:
            if isinstance(e, CheckpointError):
                error = (_KINDS.index(type(e)) if type(e) in _KINDS else 0, str(e))
            else:
                error = (0, f"{type(e).__name__}: {e}")
            outcome = None
        outcome, errors = self.broadcast(outcome), self.all_gather(error)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if bad:
            kinds = {kind for _, (kind, _) in bad}
            cls = _KINDS[kinds.pop()] if len(kinds) == 1 else CheckpointError
            raise cls("; ".join(text if self.world_size == 1 else f"rank {r}: {text}"
                                for r, (_, text) in bad))
        return outcome

    def all_true(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return bool(t.item())
