"""Tensor parallelism (Megatron-LM): attention heads and FFN columns split over the tp group.

Activations stay whole (replicated) on every tensor rank; a block's attention
and its FFN each cost one all-reduce forward and one backward:

    x -> copy_to_tp -> [wq, wk, wv column shards | w1, w3 column shards]  (local heads / columns)
      -> [wo | w2 row shards] -> partial sums -> reduce_from_tp -> y

`copy_to_tp` is the identity forward and sums the input gradient backward (each
rank only sees its heads' share of it); `reduce_from_tp` sums the partial
outputs forward and is the identity backward (collectives.py). Stacked experts (E, D, F) are
split the same way along F. The router, the norms, the embedding and the head
stay whole on every tensor rank (their gradients are identical there).

K and V: with n_kv_heads divisible by tp they are split like Q. With fewer KV
heads than tensor ranks (MQA's single head, as in the seed) each rank keeps the
whole K/V projection and uses the heads its query heads need, as Megatron
does; those weights are replicated, so their gradients are partial sums that
the optimizer side adds over tp (`ShardTag.tp_partial`).

Sequence parallelism (`sequence_parallel=True`, Korthikanti et al. 2022): between
the TP regions the residual stream, the norms and the router hold only this
rank's 1/tp of the sequence, (B, T / tp, D); a region starts with gather_seq
(all-gather; backward reduce-scatter) and ends with reduce_scatter_seq
(reduce-scatter; backward all-gather) in place of copy_to_tp / reduce_from_tp.
The norms' and the router's weights then see only their rank's tokens, so their
gradients are partial sums over tp (`tp_partial`, summed by the optimizer side).
The MoE routes its own tokens (sequence_parallel.py) and the experts gather
rows over their expert-tensor group (expert_parallel.py): the whole tp group
by default, none at all when etp = 1 and each expert is whole on its rank. The embedding and the head are
vocabulary-parallel (vocab_parallel.py): the embedding's reduce-scatter enters
the sequence-sharded stream and the head's all-gather leaves it.

Parameters stay plain local tensors (not DTensor parameters): the model code,
the pipeline stage, the gradient reducer and the ZeRO optimizer (zero.py) all
see ordinary tensors. The checkpoint exposes each shard as a
DTensor with its placement (see sharding.py), so DCP reshards across layouts.
Apply on the meta device, before materialising: `apply_tp` slices meta tensors
(no memory), and materialise.py then fills each shard with its slice of the
whole model's initial values (see engine.build_model_parts).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from moray.model.layers import Attention
from moray.model.moe import MLP, MoE
from moray.parallel.collectives import copy_to_tp, gather_seq, reduce_from_tp, reduce_scatter_seq
from moray.parallel.expert_parallel import ParallelExperts, as_parallel_experts
from moray.parallel.sequence_parallel import SequenceParallelMoE
from moray.parallel.sharding import tag


class ReplicatedKV(nn.Module):
    """A K or V projection kept whole on each tensor rank; forward returns only the one KV head
    this rank's query heads share. The parameter is still called `weight` (same FQN)."""

    def __init__(self, linear: nn.Linear, head_dim: int, kv_head: int):
        super().__init__()
        self.weight = linear.weight
        self.rows = slice(kv_head * head_dim, (kv_head + 1) * head_dim)
        self.in_features, self.out_features = linear.in_features, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[self.rows])


def _narrow_linear(lin: nn.Linear, dim: int, rank: int, size: int) -> None:
    """Keep this rank's 1/size of `lin.weight` (out, in) along `dim`: 0 splits the outputs (column
    parallel), 1 the inputs (row parallel)."""
    w = lin.weight.detach()
    n = w.shape[dim] // size
    lin.weight = nn.Parameter(w.narrow(dim, rank * n, n).clone())
    lin.out_features, lin.in_features = lin.weight.shape
    tag(lin, "weight", tp_dim=dim)


def _wrap_in_tp_region(module: nn.Module, group, sequence_parallel: bool = False) -> None:
    """copy_to_tp on the module's first input, reduce_from_tp on its output; under sequence
    parallelism gather_seq and reduce_scatter_seq."""
    enter, leave = (gather_seq, reduce_scatter_seq) if sequence_parallel else (copy_to_tp, reduce_from_tp)
    module.register_forward_pre_hook(lambda m, args: (enter(args[0], group),) + tuple(args[1:]))
    module.register_forward_hook(lambda m, args, out: leave(out, group))


def apply_tp_attention(att: Attention, group, rank: int, size: int, sequence_parallel: bool = False) -> None:
    _narrow_linear(att.wq, 0, rank, size)
    if att.n_kv_heads % size == 0:
        _narrow_linear(att.wk, 0, rank, size)
        _narrow_linear(att.wv, 0, rank, size)
    else:  # fewer KV heads than ranks: keep them whole, use the one this rank's query heads share
        first_q = rank * att.n_heads // size
        kv_head = first_q // (att.n_heads // att.n_kv_heads)
        for name in ("wk", "wv"):
            kv = ReplicatedKV(getattr(att, name), att.head_dim, kv_head)
            tag(kv, "weight", tp_partial=True)
            setattr(att, name, kv)
    _narrow_linear(att.wo, 1, rank, size)
    _wrap_in_tp_region(att, group, sequence_parallel)


def apply_tp_mlp(mlp: MLP, group, rank: int, size: int, sequence_parallel: bool = False) -> None:
    _narrow_linear(mlp.w1, 0, rank, size)
    if mlp.w3 is not None:
        _narrow_linear(mlp.w3, 0, rank, size)
    _narrow_linear(mlp.w2, 1, rank, size)
    _wrap_in_tp_region(mlp, group, sequence_parallel)


def apply_tp_experts(moe: MoE, group, rank: int, size: int, sequence_parallel: bool = False) -> None:
    experts: ParallelExperts = as_parallel_experts(moe)
    experts.shard_ffn(group, rank, size, sequence_parallel)


def apply_tp(model: nn.Module, group, rank: int, size: int, sequence_parallel: bool = False,
             experts: Optional[Tuple[object, int, int]] = None) -> None:
    """Split every block of `model` (a whole Transformer or a pipeline stage) over the tp group;
    with sequence_parallel, activations between the TP regions are sequence shards (the
    embedding and head must then be vocabulary-parallel: apply_vocab_parallel, same flag).
    experts: (group, rank, size) of the expert-tensor group that splits the experts' FFN columns
    (dims.py's etp); None = the tp group itself. Size 1 leaves every expert whole (each tensor
    rank runs its own tokens' rows: sequence parallelism is required, ParallelDims checks it)."""
    if size == 1:
        return
    e_group, e_rank, e_size = experts if experts is not None else (group, rank, size)
    for block in model.layers.values():
        apply_tp_attention(block.attention, group, rank, size, sequence_parallel)
        ff = block.feed_forward
        if isinstance(ff, MoE):
            if e_size > 1:
                apply_tp_experts(ff, e_group, e_rank, e_size, sequence_parallel)
            if sequence_parallel:
                block.feed_forward = SequenceParallelMoE(ff, group, rank, size)
                tag(ff.gate, "weight", tp_partial=True)  # routes this rank's tokens only
        else:
            apply_tp_mlp(ff, group, rank, size, sequence_parallel)
        if sequence_parallel:
            for norm in (block.attention_norm, block.ffn_norm):
                tag(norm, "weight", tp_partial=True)  # normalises this rank's tokens only
    if sequence_parallel and getattr(model, "norm", None) is not None:
        tag(model.norm, "weight", tp_partial=True)
