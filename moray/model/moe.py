"""The Mixture-of-Experts feed-forward layer, and the dense MLP it replaces.

Legend: N = tokens, E = experts, D = d_model, F = ffn_hidden (one expert),
k = top_k, A = routed assignments (N * k, less any dropped by capacity).

Experts are stacked weights (`w1: (E, D, F)`), so a slice along dim 0 is an
expert shard; tokens are sorted by expert and every expert runs in one grouped
matrix product. The router's auxiliary losses put their gradient in place
inside the layer (as Megatron-Core does), so a pipeline schedule that only sees
the last stage's loss still trains the router; the values are kept for logging.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moray.model.config import ModelConfig


# ---------------------------------------------------------------- grouped matmul


class _GroupedMM(torch.autograd.Function):
    """`torch._grouped_mm` with a backward made of grouped products.

    The CPU build's own backward fails ("Invalid strides/sizes"), so we write it:
    dx = dy @ w^T per group (2d x 3d), dw = x^T @ dy per group (2d x 2d).
    """

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w, offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, w.transpose(-1, -2), offs) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(x.t(), dy, offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None


_TORCH_VERSION = tuple(int(v) for v in torch.__version__.split(".")[:2])


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.is_cuda:
        # The CUDA kernel is bf16 only: sm90 since torch 2.8, sm80 too since 2.9. BF16 token
        # groups need no padding to a multiple of 8/16 (torchtitan dropped it, pytorch/torchtitan#2620);
        # bench/gpu_checks.py verifies ragged and empty groups on the device.
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (
            (8, 0) if _TORCH_VERSION >= (2, 9) else (9, 0))
    # CPU: every row stride and base pointer must be a multiple of 16 bytes.
    size = x.element_size()
    return x.dtype in (torch.float32, torch.bfloat16) and all(
        (d * size) % 16 == 0 for d in (w.shape[1], w.shape[2])
    ) and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (A, K) sorted by group, w (G, K, N), counts (G,) rows per group -> (A, N)."""
    if x.is_cuda and _grouped_mm_ok(x, w):
        # No host sync, static shapes: this path compiles into one graph (torch.compile).
        return torch._grouped_mm(x, w, counts.cumsum(0).to(torch.int32))
    return _grouped_mm_eager(x, w, counts)


@torch.compiler.disable  # the CPU kernel has no float32 fake impl and the loop reads counts on the host
def _grouped_mm_eager(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if not x.is_cuda and _grouped_mm_ok(x, w):
        offs = counts.cumsum(0).to(torch.int32)
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return _GroupedMM.apply(x, w, offs)
        return torch._grouped_mm(x, w, offs)  # no autograd node to build (serving, evaluation)
    return _grouped_mm_loop(x, w, counts)


def _grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The fallback: one product per expert (never per token). It reads counts on the host (a
    device sync per call), so the GPU checks assert a bf16 step never gets here."""
    chunks = torch.split(x, counts.tolist())
    return torch.cat([c @ w[g] for g, c in enumerate(chunks)]) if len(chunks) else x.new_zeros(0, w.shape[-1])


# ---------------------------------------------------------------- experts


class GroupedExperts(nn.Module):
    """E stacked experts. forward takes tokens already sorted by expert."""

    def __init__(self, n_experts: int, d_model: int, ffn_hidden: int, mlp: str):
        super().__init__()
        self.mlp = mlp
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, ffn_hidden))  # gate (swiglu) / up (gelu)
        self.w2 = nn.Parameter(torch.empty(n_experts, ffn_hidden, d_model))  # down
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, ffn_hidden)) if mlp == "swiglu" else None  # up
        # Global id of the first expert held here; an expert-parallel shard sets it,
        # so each expert gets the same initial weights under any layout.
        self.expert_offset = 0
        # Serving only (serve/engine/layout.py): w1 and w3 side by side, (E, D, 2F), with w1 and w3
        # views of it, so gate and up are one grouped product. Not a parameter: names stay w1/w3.
        self.w13: Optional[torch.Tensor] = None
        # Serving only (serve/engine/layout.py, CPU): {"w13" | "w1" | "w3" | "w2": one callable per
        # expert, a -> a @ that expert's weight}, each on a weight prepacked for the CPU's kernels.
        self.serve_products: Optional[Dict[str, List[Callable]]] = None

    @property
    def num_local_experts(self) -> int:
        return self.w1.shape[0]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (A, D) sorted by expert, counts (E,) -> (A, D)."""
        products = getattr(self, "serve_products", None)
        if products is not None and x.device.type == "cpu" and not torch.is_grad_enabled():
            return self._per_expert(x, counts, products)
        return self._ffn(x, lambda a, name: grouped_mm(a, getattr(self, name), counts))

    def _per_expert(self, x: torch.Tensor, counts: torch.Tensor, products) -> torch.Tensor:
        """Serving on the CPU: each expert that has rows, on its prepacked weights (layout.py says
        why this beats one grouped product)."""
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                outs.append(self._ffn(x[start:start + n], lambda a, name: products[name][e](a)))
                start += n
        if not outs:
            return x.new_zeros(0, x.shape[-1])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _ffn(self, x: torch.Tensor, mm: Callable[[torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
        """The experts' MLP; mm(a, name) multiplies rows by the weight `name` (w13, w1, w3, w2)."""
        if self.w13 is not None:
            gate, up = mm(x, "w13").chunk(2, dim=-1)  # (A, F) each
            return mm(F.silu(gate) * up, "w2")  # (A, D)
        h = mm(x, "w1")  # (A, F)
        if self.w3 is not None:
            h = F.silu(h) * mm(x, "w3")
        else:
            h = F.gelu(h, approximate="tanh")
        return mm(h, "w2")  # (A, D)


class MLP(nn.Module):
    """The dense feed-forward (n_experts == 1), same naming as one expert."""

    def __init__(self, d_model: int, ffn_hidden: int, mlp: str):
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_hidden, bias=False)
        self.w2 = nn.Linear(ffn_hidden, d_model, bias=False)
        self.w3 = nn.Linear(d_model, ffn_hidden, bias=False) if mlp == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w1(x)
        h = F.silu(h) * self.w3(x) if self.w3 is not None else F.gelu(h, approximate="tanh")
        return self.w2(h)


# ---------------------------------------------------------------- routing


class _AuxLossGrad(torch.autograd.Function):
    """Identity on `out`; in backward, hands `aux` a gradient of `scale`.

    This adds `scale * aux` to the objective without the caller having to add
    it to the loss (Megatron-Core's MoEAuxLossAutoScaler).
    """

    @staticmethod
    def forward(ctx, out, aux, scale: float):
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        ctx.aux_dtype = aux.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


def count_per_expert(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(E,) int64 assignments per expert. Unlike bincount, no device-to-host sync on CUDA."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balancing_loss(probs: torch.Tensor, expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer's loss, E * sum_i f_i * P_i; exactly 1 for uniform routing.

    f_i: share of the N*k assignments that go to expert i; P_i: mean router
    probability of expert i over the N tokens.
    """
    f = count_per_expert(expert_ids, n_experts).float() / expert_ids.numel()
    return n_experts * (f * probs.mean(0)).sum()


def capacity_keep_mask(expert_ids: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """expert_ids (N, k) -> bool (N, k): which assignments fit in each expert's capacity.

    Priority as in GShard: every token's first choice before any second choice,
    then token order; the overflow beyond `capacity` per expert is dropped.
    """
    by_priority = expert_ids.t().reshape(-1)  # (k * N,), slot-major
    one_hot = F.one_hot(by_priority, n_experts)  # (kN, E)
    position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # rank of each assignment within its expert
    keep = position < capacity
    return keep.view(expert_ids.shape[1], -1).t()  # (N, k)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.capacity_factor = cfg.n_experts, cfg.top_k, cfg.capacity_factor
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)  # the router
        self.experts = GroupedExperts(cfg.n_experts, cfg.d_model, cfg.ffn_hidden, cfg.mlp)
        # The objective is mean over MoE layers of each loss, so each layer carries coef / L.
        self.aux_loss_coef = cfg.aux_loss_coef / cfg.n_layers
        self.z_loss_coef = cfg.z_loss_coef / cfg.n_layers
        self.aux_grad_scale = 1.0  # the trainer's loss scale (1 / microbatches); see set_aux_grad_scale
        self.last_stats: Optional[dict] = None

    def capacity(self, n_tokens: int) -> Optional[int]:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (N, D)
        N = xf.shape[0]
        logits = self.gate(xf).float()  # (N, E); routing in float32
        probs = logits.softmax(-1)
        weights, expert_ids = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)

        objective, stats = self.router_terms(logits, probs, expert_ids)

        # Assignment slots: slot s = token s // k, its (s % k)-th choice.
        flat_experts = expert_ids.reshape(-1)  # (N*k,)
        slots = torch.arange(N * self.top_k, device=x.device)
        keep = self.keep_mask(expert_ids, shape[:-1])
        if keep is not None:
            keep = keep.reshape(-1)
            slots, flat_experts = slots[keep], flat_experts[keep]

        order = torch.argsort(flat_experts, stable=True)  # (A,) sorted by expert, token order within
        sorted_slots = slots[order]
        counts = count_per_expert(flat_experts, self.n_experts)
        routed = self.experts(xf[sorted_slots // self.top_k], counts)  # (A, D)
        # Back to slot order, (N, k, D), zeros for dropped slots: a copy to unique rows (its backward
        # a gather), not an atomic scatter-add, so the combine is deterministic on CUDA.
        base = routed.new_zeros if keep is not None else routed.new_empty
        by_slot = base(N * self.top_k, routed.shape[-1]).index_copy(0, sorted_slots, routed)
        out = (by_slot.view(N, self.top_k, -1) * weights.unsqueeze(-1).to(routed.dtype)).sum(1).to(xf.dtype)

        if objective is not None and torch.is_grad_enabled() and logits.requires_grad:
            out = _AuxLossGrad.apply(out, objective, self.aux_grad_scale)
        # "dropped" is a host number: N*k without capacity; with it, the boolean indexing above already synced.
        # "expert_ids" (N, k): a fixed-shape replay pads the batch and counts only its real rows.
        self.last_stats = {**stats, "dropped": torch.tensor(N * self.top_k - flat_experts.numel()),
                           "expert_ids": expert_ids.detach()}
        return out.view(shape)

    def router_terms(self, logits: torch.Tensor, probs: torch.Tensor, expert_ids: torch.Tensor):
        """(objective, stats): what the router losses add to the objective (None: nothing) and
        what is logged (load_balancing_loss, z_loss, tokens_per_expert, detached). Here both are
        over this call's N tokens. A layer that sees only part of a batch's tokens (sequence
        parallelism) overrides it: it must log the whole batch's values and put in the objective
        only its share, so that the shares add up to the whole."""
        tokens_per_expert = count_per_expert(expert_ids, self.n_experts)
        if torch.is_inference_mode_enabled():  # serving has no use for the router losses
            return None, {"load_balancing_loss": None, "z_loss": None, "tokens_per_expert": tokens_per_expert}
        balance = load_balancing_loss(probs, expert_ids, self.n_experts)
        z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        objective = self.aux_loss_coef * balance + self.z_loss_coef * z_loss
        return objective, {"load_balancing_loss": balance.detach(), "z_loss": z_loss.detach(),
                           "tokens_per_expert": tokens_per_expert}

    def keep_mask(self, expert_ids: torch.Tensor, batch_shape) -> Optional[torch.Tensor]:
        """bool (N, k): the assignments within capacity, or None when dropless. batch_shape is the
        input's shape without D (its tokens, N in all), for an override that must place them in a
        larger batch (sequence parallelism: capacity and priority are the whole sequence's)."""
        cap = self.capacity(expert_ids.shape[0])
        return None if cap is None else capacity_keep_mask(expert_ids, self.n_experts, cap)


def set_aux_grad_scale(model: nn.Module, scale: float) -> None:
    """Scale the router losses' gradient like the main loss (e.g. 1 / microbatches)."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.aux_grad_scale = scale
