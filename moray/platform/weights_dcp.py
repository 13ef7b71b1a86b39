"""Reading one piece of each tensor from a DCP checkpoint, and only that piece's bytes.

    pieces = {"model.layers.0.feed_forward.experts.w1": torch.empty(2, 64, 128)}   # the wanted shapes
    offsets = {"model.layers.0.feed_forward.experts.w1": (2, 0, 0)}               # where they start
    dcp.load(pieces, storage_reader=RangedReader(cfs.dcp_reader(loc)),
             planner=NarrowLoadPlanner(offsets), no_dist=True)

Selecting: DCP's own resharding does the work. A DTensor or ShardedTensor tells DCP's planner
which chunk of the global tensor a rank holds (`__create_chunk_list__`); `NarrowLoadPlanner` says
the same of plain tensors from an offsets table, so `create_read_items_for_chunk_list` (the
function DCP reshards with) turns each piece into read items against whatever chunks the
checkpoint was saved in, under any layout, with no process group and no mesh.

Reading: DCP's FileSystemReader `torch.load`s every stored chunk a read item touches whole and
narrows afterwards, so a rank after 2 of 8 experts of a checkpoint saved whole would still read
all 8. `RangedReader` reads the same files, but for each item it loads the chunk's record onto the
meta device first (its pickle only: shape, strides, dtype, and where torch.save put the bytes,
`_checkpoint_offset`), then reads just the byte runs the item covers: one run for a slice of
dim 0 (an expert shard), one per row for a slice of a later dim (a tensor-parallel column
shard). Anything it does not recognise (a transformed stream, a non-contiguous record, an older
torch without the offset) goes to the wrapped reader, which reads it the usual way. No Ray here.
"""

from __future__ import annotations

import io
import itertools
import math
import os

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, StorageReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.futures import Future

# A gap between two runs is read through (one request instead of two) when it is at most this
# fraction of a run: a remote store pays per request, but a rank must not read its peers' columns.
MAX_WASTE = 0.125


class NarrowLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner for a state dict of pieces: each plain tensor is the piece of the
    stored tensor that starts at `offsets[fqn]` (all zeros if absent) and has the tensor's shape."""

    def __init__(self, offsets: Dict[str, Sequence[int]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.offsets = {k: tuple(v) for k, v in offsets.items()}

    def create_local_plan(self) -> LoadPlan:
        items: List[ReadItem] = []
        for fqn, piece in self.state_dict.items():
            md = self.metadata.state_dict_metadata.get(fqn)
            if not isinstance(md, TensorStorageMetadata):
                raise KeyError(f"the checkpoint holds no tensor {fqn!r}")
            start = self.offsets.get(fqn, (0,) * piece.dim())
            if len(start) != piece.dim() or any(o < 0 or o + n > s for o, n, s in zip(start, piece.shape, md.size)):
                raise ValueError(f"{fqn}: a piece of shape {tuple(piece.shape)} at {start} does not lie inside the "
                                 f"stored {tuple(md.size)}")
            chunk = ChunkStorageMetadata(offsets=torch.Size(start), sizes=piece.shape)
            items += create_read_items_for_chunk_list(fqn, md, [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index) -> torch.Tensor:
        # Read items address the piece itself: their dest_offsets are relative to its chunk.
        return self.state_dict[index.fqn]


class RangedReader(StorageReader):
    """A FileSystemReader (DCP's, or moray's safe one) that reads only the bytes each tensor item
    covers. Everything but tensor reads is the wrapped reader's."""

    def __init__(self, inner, max_waste: float = MAX_WASTE):
        self.inner, self.max_waste = inner, max_waste

    # the StorageReader interface: the wrapped reader's
    def reset(self, checkpoint_id=None) -> None:
        self.inner.reset(checkpoint_id)

    def read_metadata(self, *args, **kwargs):
        return self.inner.read_metadata(*args, **kwargs)

    def set_up_storage_reader(self, metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.inner.set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return self.inner.prepare_local_plan(plan)

    def prepare_global_plan(self, plans: List[LoadPlan]) -> List[LoadPlan]:
        return self.inner.prepare_global_plan(plans)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False  # only ever handed over explicitly

    def read_data(self, plan: LoadPlan, planner) -> Future:
        storage = self.inner.storage_data
        mine: Dict[str, List[ReadItem]] = {}
        theirs: List[ReadItem] = []
        for item in plan.items:
            info = storage[item.storage_index]
            if item.type == LoadItemType.TENSOR and not getattr(info, "transform_descriptors", None):
                mine.setdefault(info.relative_path, []).append(item)
            else:
                theirs.append(item)
        for relative_path, items in mine.items():
            with self.inner.fs.create_stream(self.inner.fs.concat_path(self.inner.path, relative_path), "rb") as f:
                for item in items:
                    info = storage[item.storage_index]
                    got = _read_piece(_Window(f, info.offset, info.length), item.storage_offsets, item.lengths,
                                      self.max_waste)
                    if got is None:
                        theirs.append(item)
                        continue
                    target = planner.resolve_tensor(item).detach()
                    if target.shape != got.shape:
                        raise AssertionError(f"{item.storage_index}: read {tuple(got.shape)}, the planner wants "
                                             f"{tuple(target.shape)}")
                    target.copy_(got)
                    planner.commit_tensor(item, target)
        if theirs:
            self.inner.read_data(LoadPlan(theirs), planner).wait()
        done: Future = Future()
        done.set_result(None)
        return done


def _read_piece(f: io.RawIOBase, offsets: Sequence[int], lengths: Sequence[int], max_waste: float
                ) -> Optional[torch.Tensor]:
    """The piece [offsets, offsets + lengths) of the tensor torch.save wrote at the start of `f`,
    reading its pickle and the piece's bytes only; None where that cannot be done safely."""
    # No tensor bytes are read here, but the zip reader's look for its directory reads the
    # record's last 4 KiB: ~5 KiB per item in all, nothing beside a real model's tensors.
    meta = torch.load(f, map_location="meta", weights_only=True)
    start = getattr(meta.untyped_storage(), "_checkpoint_offset", None) if isinstance(meta, torch.Tensor) else None
    if start is None or not meta.is_contiguous() or meta.dim() == 0 or meta.dim() != len(lengths):
        return None
    shape, size = tuple(meta.shape), meta.element_size()
    lengths = tuple(lengths)
    if any(n == 0 for n in lengths):
        return torch.empty(lengths, dtype=meta.dtype)
    # The last dim that is not whole: below it every piece row is one contiguous run of bytes.
    cut = max((d for d in range(len(shape)) if lengths[d] != shape[d]), default=0)
    run = lengths[cut] * math.prod(shape[cut + 1:])  # elements
    strides = meta.stride()
    base = meta.storage_offset() + offsets[cut] * strides[cut]
    runs = [base + sum((o + i) * s for o, i, s in zip(offsets[:cut], idx, strides[:cut]))
            for idx in itertools.product(*(range(n) for n in lengths[:cut]))]  # element starts, ascending
    out = torch.empty(len(runs) * run, dtype=meta.dtype)
    buf = memoryview(out.view(torch.uint8).numpy())
    for first, last in _merged(runs, run, int(run * max_waste)):
        span = runs[last] + run - runs[first]
        data = _read_exact(f, start + runs[first] * size, span * size)
        for k in range(first, last + 1):
            at = (runs[k] - runs[first]) * size
            buf[k * run * size:(k + 1) * run * size] = data[at:at + run * size]
    return out.view(lengths)


def _merged(runs: List[int], run: int, gap: int) -> List[Tuple[int, int]]:
    """Runs (element starts, each `run` long) grouped into reads: (first, last) index pairs."""
    groups, first = [], 0
    for k in range(1, len(runs) + 1):
        if k == len(runs) or runs[k] - (runs[k - 1] + run) > gap:
            groups.append((first, k - 1))
            first = k
    return groups


def _read_exact(f: io.RawIOBase, at: int, n: int) -> memoryview:
    f.seek(at)
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise EOFError(f"checkpoint record ends {n - got} bytes early (at byte {at + got}); the file is "
                           f"truncated: verify the checkpoint (DcpWeights.verify) or use another step")
        got += k
    return view


class _Window(io.RawIOBase):
    """The bytes [offset, offset + length) of a seekable stream, as a stream of their own (where
    torch.save's record for one chunk lies inside a DCP data file)."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self.f, self.offset, self.length, self.pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = {os.SEEK_SET: pos, os.SEEK_CUR: self.pos + pos, os.SEEK_END: self.length + pos}[whence]
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.offset + self.pos)
        got = self.f.readinto(memoryview(b)[:n])
        self.pos += got or 0
        return got or 0


__all__ = ["NarrowLoadPlanner", "RangedReader", "MAX_WASTE"]
