"""bf16 training: bf16 weights, activations and gradients; fp32 master weights and AdamW state.

The model runs in bf16 end to end (what the grouped expert product, the
expert all-to-all and the pipeline sends need to be fast), and the parts whose
precision matters compute in fp32 inside it (RMSNorm's statistics, the router's
softmax and top-k, the loss's log-softmax). Gradients stay bf16 in `p.grad`.
The optimizer keeps, for each parameter whose state this rank owns, an fp32
master copy with AdamW's m and v; a step converts the gradient to fp32, updates
the master, and rounds it into the bf16 parameter (Megatron's distributed
optimizer and torchtitan's mixed precision do the same). Passed to
ZeroRedundancyOptimizer as its optimizer_class, master copies exist only for
the rank's ZeRO-1 shard, and ZeRO broadcasts the updated bf16 parameters.

Bytes per parameter: 2 weight + 2 grad + (4 master + 8 Adam) / ZeRO shards, as
`moray.platform.planner.memory.precision("bfloat16")` counts them.
"""

from __future__ import annotations

from typing import Dict, Iterable, Sequence

import torch


def adamw_options(device: torch.device) -> Dict[str, bool]:
    """One fused kernel for the whole update on the GPU (what HF's baseline uses too); the CPU keeps
    the reference implementation the layout-equivalence tests compare against."""
    return {"fused": True} if device.type == "cuda" else {}


def new_adamw_state(p: torch.Tensor, master: bool) -> Dict[str, torch.Tensor]:
    """AdamW's state for `p` as its first step would make it, all on p's device (fused AdamW refuses
    a step counter on another device); with `master`, an fp32 copy of p and fp32 m and v."""
    like = p.detach().float() if master else p.detach()
    state = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
             "exp_avg": torch.zeros_like(like, memory_format=torch.preserve_format),
             "exp_avg_sq": torch.zeros_like(like, memory_format=torch.preserve_format)}
    if master:
        state["master"] = like.clone(memory_format=torch.preserve_format)
    return state


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
        from torch.optim.adamw import adamw

        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] for p in params]
            masters = [s["master"] for s in states]
            beta1, beta2 = group["betas"]
            adamw(masters, [p.grad.float() for p in params], [s["exp_avg"] for s in states],
                  [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
                  fused=group["fused"] or None, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                  weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            torch._foreach_copy_(params, masters)
