"""The MoE layer under sequence parallelism: each tensor rank routes its own tokens.

Legend: N = this rank's tokens (its 1/tp of the microbatch), Ng = the
microbatch's tokens (N x tp), E = experts, k = top_k.

Between the TP regions a tensor rank holds (B, T / tp, D), so its router sees N
tokens and the router's compute and saved tensors are 1/tp of the whole.
Tokens are routed where they live: no gather before the router, and the rows
they send to the experts cross the ep group 1/tp as large as without sequence
parallelism (expert_parallel.py gathers them over tp at the experts).

What must still be the whole microbatch's, so that every layout trains as one
process does:

- the load-balancing loss E * sum_i f_i P_i: f_i (the share of the Ng * k
  assignments that went to expert i) and P_i (expert i's mean probability over
  Ng tokens) are sums over the tp group. One all-reduce gives the counts; the
  objective takes this rank's share E * sum_i f_i * (sum of its tokens' p_i) / Ng,
  whose gradient is the whole loss's gradient on these tokens, and the shares
  of the tp ranks add up to the loss;
- the z-loss, a mean over Ng tokens: this rank's share is its sum / Ng;
- what is logged (the losses and the tokens per expert) is the whole
  microbatch's on every tensor rank: the trainer reads tensor rank 0's;
- capacity (capacity_factor set): slots per expert are counted over the Ng
  tokens and drops follow GShard's priority over the whole sequence, so the
  ranks gather the tp group's choices (N x k ids each) and each keeps its rows
  of the common mask.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moray.model.moe import MoE, capacity_keep_mask, count_per_expert
from moray.parallel.collectives import all_gather_flat


class SequenceParallelMoE(MoE):
    """The MoE it wraps, routing this tensor rank's tokens (same parameters and names)."""

    def __init__(self, moe: MoE, group, rank: int, size: int):
        nn.Module.__init__(self)
        self.__dict__.update(moe.__dict__)  # share its parameters, submodules and settings
        self.tp_group, self.tp_rank, self.tp_size = group, rank, size

    def router_terms(self, logits: torch.Tensor, probs: torch.Tensor, expert_ids: torch.Tensor):
        E = self.n_experts
        counts = count_per_expert(expert_ids, E)  # (E,)
        z_sq = torch.logsumexp(logits, dim=-1).pow(2)  # (N,)
        prob_sum = probs.sum(0)  # (E,)
        # One all-reduce: counts, probability sums, z sum and the token count of the tp group.
        whole = torch.cat([counts.double(), prob_sum.detach().double(), z_sq.detach().sum().double().view(1),
                           torch.tensor([float(logits.shape[0])], dtype=torch.float64, device=logits.device)])
        dist.all_reduce(whole, group=self.tp_group)
        counts_g, prob_sum_g, z_sum_g, n_g = whole[:E], whole[E:2 * E], whole[2 * E], whole[2 * E + 1]
        f = counts_g / (n_g * self.top_k)  # (E,) float64: the microbatch's assignment shares
        stats = {"load_balancing_loss": (E * (f * prob_sum_g).sum() / n_g).float(),
                 "z_loss": (z_sum_g / n_g).float(), "tokens_per_expert": counts_g.round().long()}
        if torch.is_inference_mode_enabled():
            return None, stats
        balance_share = (E * (f * prob_sum.double()).sum() / n_g).float()  # differentiable in this rank's probs
        z_share = (z_sq.double().sum() / n_g).float()
        return self.aux_loss_coef * balance_share + self.z_loss_coef * z_share, stats

    def keep_mask(self, expert_ids: torch.Tensor, batch_shape) -> Optional[torch.Tensor]:
        """expert_ids (N, k) of this rank's (B, T / tp) tokens -> its rows of the whole sequence's mask."""
        cap = self.capacity(expert_ids.shape[0] * self.tp_size)
        if cap is None:
            return None
        B, t, k, tp = batch_shape[0], batch_shape[1], expert_ids.shape[1], self.tp_size
        ids = expert_ids.new_empty((tp * expert_ids.shape[0], k))
        all_gather_flat(ids, expert_ids, self.tp_group)  # (tp * B * t, k)
        whole = ids.view(tp, B, t, k).transpose(0, 1).reshape(B * tp * t, k)  # (Ng, k) in sequence order
        keep = capacity_keep_mask(whole, self.n_experts, cap)  # (Ng, k)
        return keep.view(B, tp, t, k)[:, self.tp_rank].reshape(B * t, k)  # (N, k)
