"""Gradient reduction overlapped with the backward, and ZeRO-1's reduce-scatter / all-gather.

DDP's scheme on plain local tensors (DDP itself wraps one module and reduces
over one group; here a rank's parameters reduce over three kinds of group, and
a pipeline stage is not a DDP module):

- Parameters go in buckets of about `bucket_bytes`, in reverse order of
  registration (roughly the order the backward finishes them), one sequence of
  buckets per pipeline stage and kind of parameter:
    dense    replicated over dp: summed over dp;
    partial  whole on every tensor rank but each rank's gradient a partial sum
             (sequence parallelism's norms and router, MQA's shared K/V):
             summed over dp x tp in one collective;
    expert   replicated over edp (dims.py): summed over edp;
  every sum is then divided by dp (the objective is the mean over the dp
  ranks, and each token's expert gradient reaches exactly one copy of its
  expert).
- A hook on each parameter's gradient accumulation counts its bucket down; a
  bucket whose gradients are all final launches its collective asynchronously
  and the backward goes on. Buckets launch in order (DDP's rule), so every rank
  issues the same collectives in the same order whatever order its gradients
  finish in.
- Gradients are final only in the last microbatch's backward: the engine arms
  a stage just before it (its own loop; under pipelining, the stage's backward
  of microbatch m - 1, whichever the schedule), and earlier backwards only
  accumulate. `finish` launches what did not launch (a parameter without a
  gradient counts as zeros) and waits for all of it. A parameter that some
  ranks use and others do not would break the launch order; no layer here
  has one (every expert weight is in the grouped product even with no rows).
- Reductions run on process groups of their own (Meshes.reduction_group), so
  collectives in flight during the backward never meet the model's own.

ZeRO-1 (zero=1, a group of more than one rank): a sharded bucket splits each
parameter along one dimension over its group as torch.chunk (DTensor's Shard)
splits it, nested rank by rank for dp x tp, and a reduce-scatter hands each
rank the sum of exactly its pieces (FSDP2's layout: the send buffer holds, rank
after rank, every parameter's piece for that rank, padded to the largest).
The local gradient is freed once copied into the send buffer. The optimizer
(zero.py) updates the pieces and `gather_params` all-gathers them back.
Not torch's ZeroRedundancyOptimizer: it gives whole parameters to ranks
(uneven sizes) and expects gradients already all-reduced by DDP; a
reduce-scatter needs equal regions per rank, so it could only take what it
owns from an all-reduce, and its broadcast of updated parameters moves what
an all-gather moves once per rank. Not FSDP2's fully_shard: it turns
parameters into DTensors, which the tensor- and expert-parallel layers (plain
local tensors with their own collectives) do not take.

Unsharded buckets (zero=0, or a group of one rank): the gradients are views
into the bucket's flat buffer (DDP's gradient_as_bucket_view), reduced in place
by one all-reduce.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from moray.parallel.collectives import all_gather_flat, reduce_scatter_flat
from moray.parallel.dims import Coords, Meshes, ParallelDims
from moray.parallel.sharding import ParamSpec, chunk_start

# kind -> the mesh axes its copies (and its ZeRO pieces) span
KIND_AXES = {"dense": ("dp",), "partial": ("dp", "tp"), "expert": ("edp",)}


def kind_of(spec: ParamSpec, dims: ParallelDims) -> str:
    if spec.expert:
        return "expert"
    return "partial" if spec.tp_partial and dims.tp > 1 else "dense"


def kind_axes(dims: ParallelDims, coords: Coords) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """kind -> (sizes, this rank's coordinates) along KIND_AXES[kind]."""
    return {"dense": ((dims.dp,), (coords.dp,)), "partial": ((dims.dp, dims.tp), (coords.dp, coords.tp)),
            "expert": ((dims.edp,), (coords.edp,))}


def nested_chunk(size: int, sizes: Sequence[int], coords: Sequence[int]) -> Tuple[int, int]:
    """(start, length) of group rank `coords` when `size` rows are split over the axes `sizes` one
    after the other, each as torch.chunk splits: what DTensor's Shard(d) on those mesh dims holds."""
    start, length = 0, size
    for n, i in zip(sizes, coords):
        a, b = chunk_start(length, n, i), chunk_start(length, n, i + 1)
        start, length = start + a, b - a
    return start, length


@dataclass(frozen=True)
class Piece:
    """A parameter's ZeRO split in its bucket: along `dim`, group rank j holds rows
    [starts[j], starts[j] + lengths[j]); every rank's region reserves `cap` rows of `rest`
    elements at `offset`. Inside a region a piece is stored with `dim` moved first."""

    dim: int
    starts: Tuple[int, ...]
    lengths: Tuple[int, ...]
    cap: int
    rest: int
    offset: int

    def in_region(self, region: torch.Tensor, j: int, others: Sequence[int]) -> torch.Tensor:
        """Rank j's rows as stored in a flat region (`dim` first)."""
        n = self.lengths[j]
        return region.narrow(0, self.offset, n * self.rest).view(n, *others)

    @property
    def even(self) -> bool:
        """Every rank holds `cap` rows: the pieces of all ranks are one strided view (one copy)."""
        return all(n == self.cap for n in self.lengths)

    def in_regions(self, flat: torch.Tensor, region: int, others: Sequence[int]) -> torch.Tensor:
        """(ranks, cap, ...) view of every rank's rows in a buffer of regions (even pieces only)."""
        ranks = len(self.lengths)
        return flat.view(ranks, region).narrow(1, self.offset, self.cap * self.rest).view(ranks, self.cap, *others)

    def copy_all(self, dst_regions: torch.Tensor, src: torch.Tensor, region: int, others: Sequence[int],
                 to_regions: bool) -> None:
        """Every rank's rows between a whole (local) tensor and a buffer of regions, either way:
        one strided copy when the split is even, a copy per rank otherwise."""
        moved = src.movedim(self.dim, 0)  # (size, ...)
        if self.even:
            pairs = [(self.in_regions(dst_regions, region, others),
                      moved.view(len(self.lengths), self.cap, *others))]  # (ranks, cap, ...) both
        else:
            pairs = [(self.in_region(dst_regions.narrow(0, j * region, region), j, others),
                      moved.narrow(0, self.starts[j], n)) for j, n in enumerate(self.lengths) if n]
        for packed, rows in pairs:
            if to_regions:
                packed.copy_(rows)
            else:
                rows.copy_(packed)


def zero_dim(p: torch.Tensor, spec: ParamSpec, dims: ParallelDims, ranks: int) -> int:
    """The dimension ZeRO splits: one no other axis splits (so placements never nest two axes on one
    dim in an order DTensor reads differently), dim 0 when it has a row per rank (contiguous
    pieces), else the longest. Raises when every dimension is taken."""
    taken = set()
    if spec.tp_dim is not None and (dims.etp if spec.expert else dims.tp) > 1:
        taken.add(spec.tp_dim)
    if spec.expert and dims.ep > 1:
        taken.add(0)
    free = [d for d in range(p.dim()) if d not in taken]
    if not free:
        raise ValueError(f"ZeRO-1 finds no dimension of a {tuple(p.shape)} parameter that tensor or expert "
                         f"parallelism leaves whole; use parallel.zero=0 for this model")
    if 0 in free and p.shape[0] >= ranks:
        return 0
    return max(free, key=lambda d: (p.shape[d], -d))


class Bucket:
    """Parameters of one stage and kind, reduced by one collective."""

    def __init__(self, stage: int, kind: str, entries: List[Tuple[str, nn.Parameter, ParamSpec]], sharded: bool,
                 sizes: Sequence[int], coords: Sequence[int], dims: ParallelDims):
        self.stage, self.kind, self.entries, self.sharded = stage, kind, entries, sharded
        self.n = math.prod(sizes)
        self.rank = 0  # this rank's index in the group, row-major over the axes
        for s, c in zip(sizes, coords):
            self.rank = self.rank * s + c
        p0 = entries[0][1]
        self.dtype, self.device = p0.dtype, p0.device
        self.pieces: Dict[str, Piece] = {}
        self.flat: Optional[torch.Tensor] = None  # unsharded: the gradients' storage
        self.out: Optional[torch.Tensor] = None  # sharded: this rank's reduced region
        self.work = None
        self._send: Optional[torch.Tensor] = None
        self.pending = len(entries)
        self.launched = False
        if sharded:
            offset = 0
            all_coords = list(itertools.product(*(range(s) for s in sizes)))  # row-major = group rank order
            for fqn, p, spec in entries:
                d = zero_dim(p, spec, dims, self.n)
                split = [nested_chunk(p.shape[d], sizes, c) for c in all_coords]
                piece = Piece(d, tuple(a for a, _ in split), tuple(n for _, n in split), max(n for _, n in split),
                              p.numel() // max(p.shape[d], 1), offset)
                self.pieces[fqn] = piece
                offset += piece.cap * piece.rest
            self.region = offset
        else:
            self.flat = torch.zeros(sum(p.numel() for _, p, _ in entries), dtype=self.dtype, device=self.device)
            self.attach_views()

    def attach_views(self) -> None:
        """Unsharded: each gradient is a view of the flat buffer (autograd accumulates into it)."""
        start = 0
        for _, p, _ in self.entries:
            p.grad = self.flat.narrow(0, start, p.numel()).view_as(p)
            start += p.numel()

    @staticmethod
    def others(p: torch.Tensor, piece: Piece) -> List[int]:
        return [s for i, s in enumerate(p.shape) if i != piece.dim]

    def launch(self, group) -> None:
        """Start this bucket's reduction (async); the gradients must be final."""
        self.launched = True
        if not self.sharded:
            if self.n > 1:
                self.work = dist.all_reduce(self.flat, group=group, async_op=True)
            return
        send = torch.zeros(self.n * self.region, dtype=self.dtype, device=self.device)  # (n x region)
        for fqn, p, _ in self.entries:
            if p.grad is None:  # no gradient this step: zeros, as the padding already is
                continue
            piece = self.pieces[fqn]
            piece.copy_all(send, p.grad, self.region, self.others(p, piece), to_regions=True)
            p.grad = None  # copied: what this rank keeps is its reduced piece
        self.out = torch.empty(self.region, dtype=self.dtype, device=self.device)
        self.work = reduce_scatter_flat(self.out, send, group, async_op=True)
        self._send = send  # alive until the collective is done

    def wait(self, dp: int) -> None:
        if self.work is not None:
            self.work.wait()
        self.work, self._send = None, None
        if dp > 1:
            (self.out if self.sharded else self.flat).div_(dp)

    def grad_piece(self, fqn: str, p: torch.Tensor) -> torch.Tensor:
        """This rank's reduced gradient for `fqn`: its piece (sharded; `dim` back in place) or p.grad."""
        if not self.sharded:
            return p.grad
        piece = self.pieces[fqn]
        return piece.in_region(self.out, self.rank, self.others(p, piece)).movedim(0, piece.dim)


class GradReducer:
    """Every gradient of this rank's parameters, reduced as soon as it is final (module doc)."""

    def __init__(self, named: Dict[str, Tuple[nn.Parameter, ParamSpec]], stage_of: Dict[str, int],
                 dims: ParallelDims, meshes: Optional[Meshes], coords: Coords, zero: int, bucket_bytes: int,
                 overlap: bool = True):
        self.dims, self.meshes, self.coords, self.overlap = dims, meshes, coords, overlap
        self.named = named
        self.sequences: List[List[Bucket]] = []
        self.bucket_of: Dict[str, Bucket] = {}
        self._group_of_kind: Dict[str, object] = {}
        axes = kind_axes(dims, coords)
        for stage in sorted(set(stage_of.values())):
            for kind in ("dense", "partial", "expert"):
                entries = [(fqn, p, spec) for fqn, (p, spec) in named.items()
                           if stage_of[fqn] == stage and kind_of(spec, dims) == kind]
                if not entries:
                    continue
                sizes, mine = axes[kind]
                sharded = bool(zero) and math.prod(sizes) > 1
                seq = [Bucket(stage, kind, chunk, sharded, sizes, mine, dims)
                       for chunk in _chunks(list(reversed(entries)), bucket_bytes)]
                self.sequences.append(seq)
                for b in seq:
                    for fqn, _, _ in b.entries:
                        self.bucket_of[fqn] = b
        self._armed: set = set()
        self._next = [0] * len(self.sequences)
        self._seq_index = {id(b): i for i, seq in enumerate(self.sequences) for b in seq}
        if overlap:  # the hooks live as long as the parameters (the engine's)
            for fqn, (p, _) in named.items():
                p.register_post_accumulate_grad_hook(self._hook(fqn))

    # ------------------------------------------------------------ groups

    def group(self, kind: str):
        if kind not in self._group_of_kind:
            self._group_of_kind[kind] = self.meshes.reduction_group(*KIND_AXES[kind])
        return self._group_of_kind[kind]

    def make_groups(self) -> None:
        """Create the reduction groups now, not mid-backward. Collective: decided from the layout
        alone (not from this rank's parameters), so every rank creates the same groups in order."""
        for kind, (sizes, _) in kind_axes(self.dims, self.coords).items():
            if math.prod(sizes) > 1:
                self.group(kind)

    # ------------------------------------------------------------ the step

    def zero_grad(self) -> None:
        for seq in self.sequences:
            for b in seq:
                if b.sharded:
                    b.out = None
                    for _, p, _ in b.entries:
                        p.grad = None
                else:
                    b.flat.zero_()
                    b.attach_views()  # in case anything replaced a gradient

    def arm(self, stage: Optional[int] = None) -> None:
        """The next backward of `stage` (None: of every stage) is its last this step: reduce as it goes."""
        if stage is None:
            self._armed.update(b.stage for seq in self.sequences for b in seq)
        else:
            self._armed.add(stage)

    def _hook(self, fqn: str) -> Callable[[torch.Tensor], None]:
        def on_grad(param: torch.Tensor) -> None:
            b = self.bucket_of[fqn]
            if b.stage not in self._armed or b.launched:
                return
            b.pending -= 1
            if b.pending == 0:
                self._launch_in_order(self._seq_index[id(b)])
        return on_grad

    def _launch_in_order(self, i: int) -> None:
        seq = self.sequences[i]
        while self._next[i] < len(seq) and seq[self._next[i]].pending == 0:
            b = seq[self._next[i]]
            b.launch(self.group(b.kind) if b.n > 1 else None)
            self._next[i] += 1

    def finish(self) -> None:
        """Launch what is left, in order, and wait for every reduction. Gradients are then reduced."""
        for i, seq in enumerate(self.sequences):
            for b in seq[self._next[i]:]:
                b.pending = 0
            self._launch_in_order(i)
        for seq in self.sequences:
            for b in seq:
                b.wait(self.dims.dp)
                b.pending, b.launched = len(b.entries), False
        self._next = [0] * len(self.sequences)
        self._armed.clear()

    # ------------------------------------------------------------ after the reduction

    def grad_piece(self, fqn: str) -> torch.Tensor:
        return self.bucket_of[fqn].grad_piece(fqn, self.named[fqn][0])

    def piece(self, fqn: str) -> Optional[Piece]:
        """The ZeRO split of `fqn`, or None when this rank keeps all of it."""
        return self.bucket_of[fqn].pieces.get(fqn)

    def param_piece(self, fqn: str) -> torch.Tensor:
        """This rank's piece of the parameter (a view), or the parameter."""
        p, piece = self.named[fqn][0], self.piece(fqn)
        if piece is None:
            return p
        b = self.bucket_of[fqn]
        return p.narrow(piece.dim, piece.starts[b.rank], piece.lengths[b.rank])

    def gradients(self) -> List[torch.Tensor]:
        """Every reduced gradient this rank holds, flat buffers and regions (for scaling)."""
        out = []
        for seq in self.sequences:
            for b in seq:
                t = b.out if b.sharded else b.flat
                if t is not None:
                    out.append(t)
        return out

    def grad_bytes(self) -> int:
        """The local gradients' bytes, as the backward holds them before reduction."""
        return sum(p.numel() * p.element_size() for p, _ in self.named.values())

    @torch.no_grad()
    def gather_params(self, source: Callable[[str], torch.Tensor]) -> None:
        """Every sharded bucket's parameters from all ranks' updated pieces: source(fqn) is this
        rank's (in any dtype; rounded to the parameter's), all-gathered and copied into place."""
        pending = []
        for seq in self.sequences:
            for b in seq:
                if not b.sharded:
                    continue
                send = torch.empty(b.region, dtype=b.dtype, device=b.device)
                for fqn, p, _ in b.entries:
                    piece = b.pieces[fqn]
                    if piece.lengths[b.rank]:
                        piece.in_region(send, b.rank, b.others(p, piece)).copy_(source(fqn).movedim(piece.dim, 0))
                full = torch.empty(b.n * b.region, dtype=b.dtype, device=b.device)  # (n x region)
                pending.append((b, full, send, all_gather_flat(full, send, self.group(b.kind), async_op=True)))
        for b, full, _, work in pending:
            work.wait()
            for fqn, p, _ in b.entries:
                piece = b.pieces[fqn]
                piece.copy_all(full, p.data, b.region, b.others(p, piece), to_regions=False)


def _chunks(entries: List[Tuple[str, nn.Parameter, ParamSpec]], cap: int):
    """Consecutive runs of at most `cap` bytes (a larger parameter alone)."""
    bucket, size = [], 0
    for e in entries:
        nbytes = e[1].numel() * e[1].element_size()
        if bucket and size + nbytes > cap:
            yield bucket
            bucket, size = [], 0
        bucket.append(e)
        size += nbytes
    if bucket:
        yield bucket
