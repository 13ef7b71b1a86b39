"""Live tensor bytes and their peak on any device, the CPU included: what a rank really holds.

    with TensorMemoryMeter("cpu") as meter:
        engine = TrainEngine(...)            # building: meter.peak vs meter.live after it
        with meter.phase("step"):
            engine.step(tokens)
    meter.peak, meter.phase_peaks["step"]

torch has no CPU counterpart of torch.cuda.max_memory_allocated, and the
saved-tensor hook of memory.py sees only what autograd saves (not gradients,
optimizer temporaries, communication buffers, nor the block activation
checkpointing rebuilds). This meter is a TorchDispatchMode, as
torch.distributed._tools.mem_tracker is: every tensor an aten op returns while
it is active (factories, results, autograd's backward ops, collectives' outputs)
has its storage recorded once, with a weak reference whose callback takes the
bytes off when the storage is freed. So `live` is the bytes of every storage
created since entering that is still alive, and `peak` its maximum. It counts
tensor bytes, not allocator blocks (no caching or rounding, as the planner
counts), and misses only what never passes through the dispatcher (gloo's own
staging buffers) and storages created before entering. Slow (a Python call per
op): for tests and diagnostics, not for training.
"""

from __future__ import annotations

import contextlib
import weakref
from functools import partial
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only


class TensorMemoryMeter(TorchDispatchMode):
    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.live = 0
        self.peak = 0
        self.phase_peaks: Dict[str, int] = {}
        self.peak_phase: Optional[str] = None  # the phase in which `peak` was reached
        self._phase: Optional[str] = None
        self._storages: Dict[int, list] = {}  # id(storage) -> [weakref, bytes]

    # ------------------------------------------------------------ phases

    @contextlib.contextmanager
    def phase(self, name: str):
        """Within the block, also keep the peak under `name` (from the bytes live at entry)."""
        outer, self._phase = self._phase, name
        self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.live)
        try:
            yield self
        finally:
            self._phase = outer

    def reset_peak(self) -> None:
        self.peak, self.peak_phase, self.phase_peaks = self.live, self._phase, {}

    # ------------------------------------------------------------ counting

    def _record(self, t: torch.Tensor) -> None:
        if t.device.type != self.device_type:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # subclasses without storage
            return
        nbytes = storage.nbytes()
        entry = self._storages.get(id(storage))
        if entry is None:
            ref = weakref.ref(storage, partial(self._freed, id(storage)))
            self._storages[id(storage)] = [ref, nbytes]
            self._add(nbytes)
        elif entry[1] != nbytes:  # resized in place (an out= op)
            self._add(nbytes - entry[1])
            entry[1] = nbytes

    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self._phase
        if self._phase is not None and self.live > self.phase_peaks.get(self._phase, 0):
            self.phase_peaks[self._phase] = self.live

    def _freed(self, key: int, _ref) -> None:
        entry = self._storages.pop(key, None)
        if entry is not None:
            self.live -= entry[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._record, out)
        return out
