"""Collectives with autograd: what the tensor- and expert-parallel layers exchange.

copy_to_tp / reduce_from_tp are Megatron-LM's f and g: a tensor-parallel
region starts with copy_to_tp (identity forward; backward sums the input
gradient, of which each rank holds its own heads' or columns' share) and ends
with reduce_from_tp (forward sums the partial outputs; identity backward).
all_to_all sends in_splits[r] rows to rank r and receives out_splits[r] rows
from it; its backward is the reverse exchange. Under sequence parallelism the
TP regions start with gather_seq and end with reduce_scatter_seq instead, and
the expert rows cross the tp group with gather_rows / reduce_scatter_rows.

These are autograd functions over plain tensors, not DTensor layouts
(torch.distributed.tensor.parallel's SequenceParallel / ColwiseParallel): those
turn parameters into DTensors, and moray's parameters stay plain local tensors
(see tensor_parallel.py); the expert rows are not a sequence layout at all.
"""

from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def _exchange(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: List[int], in_splits: List[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


# ---------------------------------------------------------------- sequence parallelism
#
# Megatron-LM's sequence-parallel pair: a TP region starts with an all-gather of the
# sequence shards (backward: reduce-scatter of the input gradient, each rank's
# partial share summed and split back) and ends with a reduce-scatter of the partial
# outputs (backward: all-gather). Together they move what one all-reduce moves, and
# between regions every rank holds only its 1/tp of the tokens. Activations are
# (B, T, D) and shard along T (dim 1); the collectives work on dim 0, so B > 1 costs a
# transposing copy on each side (Megatron keeps (T, B, D) to avoid it; at B = 1 it is free).


def all_gather_flat(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """out (size * n, ...) <- every rank's x (n, ...), rank order. torch 2.13 renamed
    all_gather_into_tensor to all_gather_single (the old name warns); 2.11 has only the old one.
    async_op: returns the collective's Work (wait() before reading out)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(out, x.contiguous(), group=group, async_op=async_op)


def reduce_scatter_flat(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """out (n, ...) <- this rank's n rows of the sum of every rank's x (size * n, ...)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(out, x.contiguous(), group=group, async_op=async_op)


def _gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """(n, ...) on each of the group's ranks -> (size * n, ...), rank order."""
    out = x.new_empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]))
    all_gather_flat(out, x, group)
    return out


def _reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    """(size * n, ...) partial sums on each rank -> this rank's (n, ...) of their sum."""
    out = x.new_empty((x.shape[0] // dist.get_world_size(group),) + tuple(x.shape[1:]))
    reduce_scatter_flat(out, x, group)
    return out


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T / tp, D) -> (B, T, D)."""
    return _gather_dim0(x.movedim(1, 0), group).movedim(0, 1).contiguous()  # via (T, B, D)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """(B, T, D) partial sums -> this rank's (B, T / tp, D) of their sum."""
    return _reduce_scatter_dim0(x.movedim(1, 0), group).movedim(0, 1).contiguous()  # via (T, B, D)


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_seq(grad, ctx.group), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


def gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a TP region from sequence-sharded activations: (B, T / tp, D) -> (B, T, D)."""
    return _GatherSeq.apply(x, group)


def reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a TP region: partial (B, T, D) -> this rank's summed (B, T / tp, D)."""
    return _ReduceScatterSeq.apply(x, group)


# ---------------------------------------------------------------- rows of uneven length
#
# The same pair over routed expert rows, whose count differs per rank: padded to the
# longest, so one all_gather_into_tensor / reduce_scatter_tensor serves (sizes are
# known on every rank from the routing counts).


def _gather_rows(x: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    width = max(sizes)
    if width == 0:  # no rows anywhere: every rank knows it, so none calls the collective
        return x.new_zeros((0,) + tuple(x.shape[1:]))
    padded = torch.cat([x, x.new_zeros((width - x.shape[0],) + tuple(x.shape[1:]))]) if x.shape[0] < width else x
    out = _gather_dim0(padded, group)  # (size * width, D)
    return torch.cat([out[r * width:r * width + n] for r, n in enumerate(sizes)])


def _reduce_scatter_rows(x: torch.Tensor, sizes: List[int], rank: int, group) -> torch.Tensor:
    width = max(sizes)
    if width == 0:
        return x.new_zeros((0,) + tuple(x.shape[1:]))
    padded = x.new_zeros((len(sizes) * width,) + tuple(x.shape[1:]))
    start = 0
    for r, n in enumerate(sizes):
        padded[r * width:r * width + n] = x[start:start + n]
        start += n
    return _reduce_scatter_dim0(padded, group)[:sizes[rank]]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.group = sizes, group
        return _reduce_scatter_rows(x, sizes, rank, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.sizes, ctx.group), None, None, None


def gather_rows(x: torch.Tensor, sizes: List[int], rank: int, group) -> torch.Tensor:
    """Every rank's rows (sizes[r] from rank r), concatenated in rank order, on every rank."""
    return _GatherRows.apply(x, sizes, rank, group)


def reduce_scatter_rows(x: torch.Tensor, sizes: List[int], rank: int, group) -> torch.Tensor:
    """Partial sums of every rank's rows (laid out as gather_rows left them) -> this rank's rows, summed."""
    return _ReduceScatterRows.apply(x, sizes, rank, group)
