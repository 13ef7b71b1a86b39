"""bf16 training: bf16 weights, activations and gradients; fp32 master weights and AdamW state.

The model runs in bf16 end to end (what the grouped expert product, the
expert all-to-all and the pipeline sends need to be fast), and the parts whose
precision matters compute in fp32 inside it (RMSNorm's statistics, the router's
softmax and top-k, the loss's log-softmax). Gradients stay bf16 in `p.grad`.
The optimizer keeps, for the piece of each parameter this rank owns, an fp32
master copy with AdamW's m and v; a step converts the gradient to fp32, updates
the master, and rounds it into the bf16 parameter (Megatron's distributed
optimizer and torchtitan's mixed precision do the same). Under ZeRO-1 the
pieces are this rank's ZeRO share (zero.py, grad_reduce.py), and the rounded
pieces are all-gathered into the bf16 parameters.

Bytes per parameter: 2 weight + 2 grad + (4 master + 8 Adam) / ZeRO shards, as
`moray.platform.planner.memory.precision("bfloat16")` counts them.
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, Sequence

import torch


def adamw_options(device: torch.device) -> Dict[str, bool]:
    """One fused kernel for the whole update on the GPU (what HF's baseline uses too); the CPU keeps
    the reference implementation the layout-equivalence tests compare against."""
    return {"fused": True} if device.type == "cuda" else {}


def new_adamw_state(p: torch.Tensor, master: bool) -> Dict[str, torch.Tensor]:
    """AdamW's state for `p` as its first step would make it, all on p's device (fused AdamW refuses
    a step counter on another device); with `master`, an fp32 copy of p and fp32 m and v. The
    tensors are contiguous, so a ZeRO piece (maybe a strided view) still gets compact state."""
    dtype = torch.float32 if master else p.dtype
    state = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
             "exp_avg": torch.zeros(p.shape, dtype=dtype, device=p.device),
             "exp_avg_sq": torch.zeros(p.shape, dtype=dtype, device=p.device)}
    if master:
        state["master"] = torch.empty(p.shape, dtype=dtype, device=p.device).copy_(p.detach())
    return state


def adamw_update(params: List[torch.Tensor], grads: List[torch.Tensor], states: List[Dict[str, torch.Tensor]], *,
                 lr: float, betas: Sequence[float], eps: float, weight_decay: float, fused: bool = False) -> None:
    """torch.optim.AdamW's update (decoupled weight decay) of `params` in place from `grads` (cast to
    the parameters' dtype), states' exp_avg / exp_avg_sq / step. The fused kernel only when asked and
    every tensor is contiguous (ZeRO pieces split along a later dimension are strided views)."""
    from torch.optim.adamw import adamw

    if not params:
        return
    grads = [g.to(p.dtype) for p, g in zip(params, grads)]
    fused = fused and all(t.is_contiguous() for t in itertools.chain(params, grads))
    beta1, beta2 = betas
    adamw(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
          [s["step"] for s in states], fused=fused or None, amsgrad=False, beta1=beta1, beta2=beta2, lr=lr,
          weight_decay=weight_decay, eps=eps, maximize=False)


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW on fp32 master copies of low-precision parameters (torch.optim.AdamW's update, decoupled
    weight decay, on the master; the parameter receives the rounded result)."""

    def __init__(self, params: Iterable, lr: float, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, fused: bool = False):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = new_adamw_state(p, master=True)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] for p in params]
            masters = [s["master"] for s in states]
            adamw_update(masters, [p.grad for p in params], states, lr=group["lr"], betas=group["betas"],
                         eps=group["eps"], weight_decay=group["weight_decay"], fused=group["fused"])
            torch._foreach_copy_(params, masters)
