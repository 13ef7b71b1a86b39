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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moray.model.moe import GroupedExperts, MoE
from moray.parallel.collectives import all_to_all, copy_to_tp, reduce_from_tp
from moray.parallel.sharding import tag


class ParallelExperts(GroupedExperts):
    """Stacked experts split over an ep group (dim 0) and/or a tp group (the F dim)."""

    def __init__(self, experts: GroupedExperts):
        nn.Module.__init__(self)
        self.mlp = experts.mlp
        self.w1, self.w2, self.w3 = experts.w1, experts.w2, experts.w3
        self.expert_offset = experts.expert_offset
        self.ep_group, self.ep_size = None, 1
        self.tp_group, self.tp_size = None, 1

    def shard_experts(self, group, rank: int, size: int) -> None:
        """Keep experts [rank * El, (rank + 1) * El). Works on the meta device (before init)."""
        n_local = self.num_local_experts // size
        for name in ("w1", "w2", "w3"):
            w = getattr(self, name)
            if w is not None:
                setattr(self, name, nn.Parameter(w.detach()[rank * n_local:(rank + 1) * n_local].clone()))
        self.expert_offset += rank * n_local
        self.ep_group, self.ep_size = group, size

    def shard_ffn(self, group, rank: int, size: int) -> None:
        """Keep this rank's F columns: w1, w3 (E, D, F) along dim 2; w2 (E, F, D) along dim 1."""
        for name, dim in (("w1", 2), ("w2", 1), ("w3", 2)):
            w = getattr(self, name)
            if w is None:
                continue
            n = w.shape[dim] // size
            setattr(self, name, nn.Parameter(w.detach().narrow(dim, rank * n, n).clone()))
            tag(self, name, tp_dim=dim)
        self.tp_group, self.tp_size = group, size

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (A, D) sorted by global expert, counts (E,) -> (A, D) in the same order."""
        if self.ep_size == 1:
            return self._local(x, counts)
        el, ep = self.num_local_experts, self.ep_size
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.ep_group)
        recv_counts = recv_counts.view(ep, el)  # [peer, local expert]
        in_splits, out_splits = torch.stack([counts.view(ep, el).sum(1), recv_counts.sum(1)]).tolist()  # one sync
        received = all_to_all(x, out_splits, in_splits, self.ep_group)  # (R, D) by peer, then expert

        # Regroup by local expert (stable: peer order within an expert).
        expert_of_row = torch.repeat_interleave(torch.arange(el, device=x.device).repeat(ep),
                                                recv_counts.reshape(-1), output_size=sum(out_splits))
        order = torch.argsort(expert_of_row, stable=True)
        y = self._local(received[order], recv_counts.sum(0))
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel(), device=order.device)
        return all_to_all(y[restore], in_splits, out_splits, self.ep_group)

    def _local(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x, counts)
        return reduce_from_tp(super().forward(copy_to_tp(x, self.tp_group), counts), self.tp_group)


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
