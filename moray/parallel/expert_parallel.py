"""Expert parallelism: each rank of an ep group holds n_experts / ep experts.

Legend: A = routed assignments on this rank, E = experts (global), El = E / ep
experts held here, R = rows received from the group, D = d_model.

`MoE.forward` routes and sorts its tokens by global expert, then calls
`experts(x (A, D), counts (E,))`. `ParallelExperts` takes that call over:

  1. all-to-all the counts, so each rank learns how many rows each peer sends
     to each of its local experts (counts first: the row exchange needs sizes);
  2. all-to-all the rows (peer r's rows for my experts arrive grouped by peer,
     then by local expert);
  3. regroup the received rows by local expert, run the El experts in one
     grouped product (and, under tensor parallelism, their FFN columns);
  4. undo the regrouping, all-to-all back, so rows come home in the order they left.

The all-to-alls (collectives.py) are autograd functions whose backward is the reverse exchange.
The same module is the tensor-parallel expert shard (F split over tp); it is a
GroupedExperts with the same parameter names (w1, w2, w3), so FQNs do not change.

Under tensor parallelism without sequence parallelism every tensor rank routes
the same tokens, exchanges the same rows over its ep group, and runs its F
columns on them (copy_to_tp / reduce_from_tp around the product). Under
sequence parallelism each tensor rank routes only its own tokens, so:

  1-2. the all-to-all over ep carries only this rank's rows (1/tp of them);
  3.   the rows received by the tp group are gathered over tp (gather_rows),
       regrouped by local expert, and every tensor rank runs its F columns on
       all of them: partial sums of the expert outputs;
  4.   a reduce-scatter over tp (reduce_scatter_rows) sums the partials and hands
       each tensor rank the rows it received, which go home by all-to-all.

So experts combine with SP x TP as Megatron-Core's expert-tensor-parallel
layout does with ETP = TP: expert weights split over tp along F, tokens routed
where they live, the exchange over ep 1/tp of the non-SP one, and the gather /
reduce-scatter over tp moving what the all-reduce moved.

The expert-tensor group need not be the whole tp group (dims.py: etp divides
tp, the ep group then spans tensor ranks as well). "tp" in this module means
that group: shard_ffn is given it, steps 3 and 4 gather and reduce-scatter over
it, and at etp = 1 there is nothing to gather: each rank runs the rows it
received through whole experts, and the only exchange is the all-to-all over
ep, which at etp 1 stays inside ep consecutive ranks (a node) instead of
crossing ep x tp of them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moray.model.moe import GroupedExperts, MoE
from moray.parallel.collectives import (all_gather_flat, all_to_all, copy_to_tp, gather_rows, reduce_from_tp,
                                       reduce_scatter_rows)
from moray.parallel.sharding import tag


class ParallelExperts(GroupedExperts):
    """Stacked experts split over an ep group (dim 0) and/or a tp group (the F dim)."""

    def __init__(self, experts: GroupedExperts):
        nn.Module.__init__(self)
        self.mlp = experts.mlp
        self.w1, self.w2, self.w3 = experts.w1, experts.w2, experts.w3
        self.w13 = getattr(experts, "w13", None)  # serving's fused gate/up view (see GroupedExperts)
        self.expert_offset = experts.expert_offset
        self.ep_group, self.ep_size = None, 1
        self.tp_group, self.tp_size, self.tp_rank = None, 1, 0
        self.sequence_parallel = False  # tensor ranks route different tokens (see the module doc)

    def shard_experts(self, group, rank: int, size: int) -> None:
        """Keep experts [rank * El, (rank + 1) * El). Works on the meta device (before init)."""
        n_local = self.num_local_experts // size
        for name in ("w1", "w2", "w3"):
            w = getattr(self, name)
            if w is not None:
                setattr(self, name, nn.Parameter(w.detach()[rank * n_local:(rank + 1) * n_local].clone()))
        self.expert_offset += rank * n_local
        self.ep_group, self.ep_size = group, size

    def shard_ffn(self, group, rank: int, size: int, sequence_parallel: bool = False) -> None:
        """Keep this rank's F columns: w1, w3 (E, D, F) along dim 2; w2 (E, F, D) along dim 1."""
        for name, dim in (("w1", 2), ("w2", 1), ("w3", 2)):
            w = getattr(self, name)
            if w is None:
                continue
            n = w.shape[dim] // size
            setattr(self, name, nn.Parameter(w.detach().narrow(dim, rank * n, n).clone()))
            tag(self, name, tp_dim=dim, split=(rank, size))
        self.tp_group, self.tp_size, self.tp_rank = group, size, rank
        self.sequence_parallel = sequence_parallel and size > 1

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (A, D) sorted by global expert, counts (E,) -> (A, D) in the same order."""
        if self.ep_size == 1:
            return self._tensor_parallel(x, counts.view(1, -1))
        el, ep = self.num_local_experts, self.ep_size
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.ep_group)
        recv_counts = recv_counts.view(ep, el)  # [peer, local expert]
        in_splits, out_splits = torch.stack([counts.view(ep, el).sum(1), recv_counts.sum(1)]).tolist()  # one sync
        received = all_to_all(x, out_splits, in_splits, self.ep_group)  # (R, D) by peer, then expert
        y = self._tensor_parallel(received, recv_counts)
        return all_to_all(y, in_splits, out_splits, self.ep_group)

    def _tensor_parallel(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (R, D) grouped by source, then local expert; counts (sources, El) -> (R, D), same order.
        Without sequence parallelism every tensor rank has the same x; with it, each has its own,
        and the tp group's rows are gathered, run, and reduce-scattered back."""
        if not self.sequence_parallel:
            if self.tp_size > 1:
                x = copy_to_tp(x, self.tp_group)
            y = self._by_expert(x, counts)
            return reduce_from_tp(y, self.tp_group) if self.tp_size > 1 else y
        all_counts = counts.new_empty((self.tp_size * counts.shape[0], counts.shape[1]))
        all_gather_flat(all_counts, counts, self.tp_group)  # (tp * sources, El)
        sizes = all_counts.view(self.tp_size, -1).sum(1).tolist()  # rows per tensor rank: one host sync
        rows = gather_rows(x, sizes, self.tp_rank, self.tp_group)  # (sum(sizes), D) by tp rank, source, expert
        y = self._by_expert(rows, all_counts)  # partial sums over this rank's F columns
        return reduce_scatter_rows(y, sizes, self.tp_rank, self.tp_group)

    def _by_expert(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (R, D) grouped by source, then local expert; counts (sources, El): regroup by expert
        (stable: source order within an expert), run the grouped product, restore the order."""
        if counts.shape[0] == 1:  # one source: already grouped by expert
            return super().forward(x, counts[0])
        el = counts.shape[1]
        expert_of_row = torch.repeat_interleave(torch.arange(el, device=x.device).repeat(counts.shape[0]),
                                                counts.reshape(-1), output_size=x.shape[0])
        order = torch.argsort(expert_of_row, stable=True)
        y = super().forward(x[order], counts.sum(0))
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel(), device=order.device)
        return y[restore]


def as_parallel_experts(moe: MoE) -> ParallelExperts:
    if not isinstance(moe.experts, ParallelExperts):
        moe.experts = ParallelExperts(moe.experts)
    return moe.experts


def apply_ep(model: nn.Module, group, rank: int, size: int) -> None:
    """Keep this rank's experts in every MoE layer of `model`; call on the meta device, before
    init_weights (which then gives each expert its global id's initial values)."""
    if size == 1:
        return
    for module in model.modules():
        if isinstance(module, MoE):
            as_parallel_experts(module).shard_experts(group, rank, size)
