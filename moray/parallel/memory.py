"""Where a rank's memory goes, and activation checkpointing.

Activations are the tensors autograd saves for backward. On the CPU a
saved-tensor hook counts them while a step runs: each storage once (views of
one tensor share it), parameters excluded (they are counted as parameters),
freed when autograd drops the saved tensor after its backward. The peak of that
running total is the activation peak. On a GPU the allocator knows better:
torch.cuda.max_memory_allocated is the total peak, and activations are what is
left after parameters, gradients and optimizer state.

Activation checkpointing (recompute.py) keeps only a checkpointed block's
input, or all but attention's tensors, and recomputes the rest in backward
(torch.utils.checkpoint, non-reentrant). The recomputed tensors live inside the
checkpoint, out of the hook's sight: the CPU count then misses one block's (or
one attention's) activations, which the planner reports as recompute_bytes.
"""

from __future__ import annotations

from typing import Dict, Iterable

import torch


class _Saved:
    """What the pack hook returns: holds the tensor; its death frees the count."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: "SavedTensorMeter", key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        # getattr: torch.compile can copy an object without running __init__.
        if getattr(self, "key", None) is not None:
            self.meter._release(self.key)


class SavedTensorMeter:
    """Live bytes of tensors saved for backward, and their peak, while the context is open.
    `params`' storage is not counted (parameters are reported as such)."""

    def __init__(self, params: Iterable[torch.Tensor] = ()):
        self._skip = {p.untyped_storage().data_ptr() for p in params}
        self._refs: Dict[int, list] = {}  # storage ptr -> [bytes, references]
        self.live = 0
        self.peak = 0
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        key = None
        if t.device.type != "meta" and not t.is_sparse:
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses)
                storage = None
            if storage is not None and storage.data_ptr() not in self._skip and storage.nbytes() > 0:
                key = storage.data_ptr()
                ref = self._refs.get(key)
                if ref is None:
                    self._refs[key] = [storage.nbytes(), 1]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                else:
                    ref[1] += 1
        return _Saved(t, self, key)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def _release(self, key) -> None:
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[1] -= 1
        if ref[1] == 0:
            self.live -= ref[0]
            del self._refs[key]

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
