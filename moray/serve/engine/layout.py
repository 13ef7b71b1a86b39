"""Weights laid out for the serving device's matrix products (values and shapes unchanged).

On the CPU here (AVX-512 with AVX512-BF16, no AMX), oneDNN's bf16 product
`x @ W` is about 5x faster when W is stored transposed (the layout nn.Linear keeps): measured
for torch._grouped_mm over 8 experts (256 x 512) in bf16 on one core, 3.7 ms row-major
against 0.79 ms column-major at 16 tokens, 201 ms against 39 ms at 1,024 tokens; in float32
the two are within 10%. The stacked expert weights (E, D, F) are kept row-major for training
(torchtitan's layout, the grouped product's backward and DCP shards read them so), so
serving re-strides its own copy: each expert column-major, the same (E, D, F) shape and
parameter names, so nothing that reads the model by name notices.

Products that read the same input are stacked (`fuse_projections`): wq, wk and wv into one
(`serve_wqkv`), an expert's gate w1 and up w3 into one (E, D, 2F) (`w13`), the old parameters
becoming views of the stacked tensor (no second copy, names unchanged). At decode sizes a
product's cost is mostly per call, not per FLOP: on one core in bf16, 8 experts' gate and up at
16 tokens take 383 us as two grouped products and 263 us as one (128 tokens: 1,514 and 1,018).
"""

from __future__ import annotations

import torch
from torch import nn

from moray.model.moe import GroupedExperts


def wants_column_major_experts(device: torch.device, dtype: torch.dtype) -> bool:
    """Where the re-striding pays: half precision on the CPU (CUDA's grouped kernel wants row-major)."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)


@torch.no_grad()
def column_major_experts(model: nn.Module) -> int:
    """Re-stride every GroupedExperts weight of `model` in place; returns how many were changed."""
    changed = 0
    for m in model.modules():
        if not isinstance(m, GroupedExperts):
            continue
        for name in ("w1", "w2", "w3"):
            w = getattr(m, name, None)
            if w is None or w.dim() != 3 or w.stride(1) == 1:
                continue
            col = w.detach().transpose(1, 2).contiguous().transpose(1, 2)  # (E, D, F), strides (D*F, 1, D)
            setattr(m, name, nn.Parameter(col, requires_grad=w.requires_grad))
            changed += 1
    return changed


def _stack(params, dim: int, column_major: bool = False) -> torch.Tensor:
    stacked = torch.cat([p.detach() for p in params], dim=dim)
    if column_major:  # each expert (D, 2F) column-major, as column_major_experts lays them
        stacked = stacked.transpose(1, 2).contiguous().transpose(1, 2)
    return stacked


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Stack wq/wk/wv and each expert's w1/w3 for serving (see the module's doc); returns how many
    stacks were made. The model's own forward (training) is unchanged: it reads wq, w1, ... which
    are views of the stacks."""
    from moray.model.layers import Attention

    made = 0
    for m in model.modules():
        if isinstance(m, Attention) and getattr(m, "serve_wqkv", None) is None:
            linears = (m.wq, m.wk, m.wv)
            if any(lin.bias is not None for lin in linears):
                continue
            wqkv = _stack([lin.weight for lin in linears], dim=0)  # (Nq + 2 Nkv, D)
            at = 0
            for lin in linears:
                n = lin.weight.shape[0]
                lin.weight = nn.Parameter(wqkv[at:at + n], requires_grad=False)
                at += n
            m.serve_wqkv = wqkv
            made += 1
        elif isinstance(m, GroupedExperts) and m.w3 is not None and m.w13 is None:
            F = m.w1.shape[2]
            w13 = _stack([m.w1, m.w3], dim=2, column_major=m.w1.stride(1) == 1)  # (E, D, 2F)
            m.w1, m.w3 = (nn.Parameter(w13[:, :, :F], requires_grad=False),
                          nn.Parameter(w13[:, :, F:], requires_grad=False))
            m.w13 = w13
            made += 1
    return made
