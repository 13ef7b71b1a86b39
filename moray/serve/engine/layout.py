"""Weights laid out for the serving device's matrix products (values and shapes unchanged).

On the CPU here (AVX-512 with AVX512-BF16, no AMX), oneDNN's bf16 product
`x @ W` is about 5x faster when W is stored transposed (the layout nn.Linear keeps): measured
for torch._grouped_mm over 8 experts (256 x 512) in bf16 on one core, 3.7 ms row-major
against 0.79 ms column-major at 16 tokens, 201 ms against 39 ms at 1,024 tokens; in float32
the two are within 10%. The stacked expert weights (E, D, F) are kept row-major for training
(torchtitan's layout, the grouped product's backward and DCP shards read them so), so
serving re-strides its own copy where its products are not prepacked (below): each expert
column-major, the same (E, D, F) shape and parameter names, so nothing that reads the model by
name notices.

Products that read the same input are stacked (`fuse_projections`): wq, wk and wv into one
(`serve_wqkv`), an expert's gate w1 and up w3 into one (E, D, 2F) (`w13`), the old parameters
becoming views of the stacked tensor (no second copy, names unchanged). At decode sizes a
product's cost is mostly per call, not per FLOP: on one core in bf16, 8 experts' gate and up at
16 tokens take 383 us as two grouped products and 263 us as one (128 tokens: 1,514 and 1,018).

On the CPU each expert's weights are also prepacked into oneDNN's blocked layout
(`prepack_experts`; the weight prepacking torch.compile's CPU backend does when freezing), and a
serving step multiplies each expert that has rows by its packed weights instead of one grouped
product, which makes one unpacked oneDNN call per expert, empty ones included. For the whole
expert MLP over 8 experts, bf16, 2 threads (bit-identical outputs):

    d 256, ffn 512:    tokens 1: 204 -> 117 us; 16: 752 -> 573; 64: 1,159 -> 817; 1,024: 10.2 -> 6.1 ms
    d 768, ffn 1536:   tokens 1: 583 -> 271 us; 16: 4.3 -> 3.0 ms; 64: 5.8 -> 4.5; 1,024: 41.7 -> 37.2

Cold in cache (64 weights of 768 x 3072, 302 MB) a product of 4 rows streams 25.7 GB/s packed
against 14.2 unpacked. The dense products (stacked q/k/v, wo, the router, the output head) are
packed the same way (`prepack_linears`). The packed copies are kept beside the weights (which
stay for everything that reads the model by name), so on the CPU the weights take twice their
memory; the 286M reference model decodes 1.3-1.5x faster for it.
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


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's prepacked linear: CPU builds with mkldnn, float32 or bfloat16 weights."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedProduct:
    """a -> a @ w for one (K, N) weight, prepacked once for oneDNN (a callable, so the model only
    sees `serve_products[name][e](rows)`); a may have leading dims."""

    def __init__(self, w: torch.Tensor, rows_hint: int = 1):
        self.k, self.n = w.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), rows_hint)  # from (N, K)

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        lead = a.shape[:-1]
        y = torch.ops.mkldnn._linear_pointwise(a.reshape(-1, self.k), self.packed, None, "none", [None], "")
        return y.view(*lead, self.n)


@torch.no_grad()
def prepack_experts(model: nn.Module) -> int:
    """Give every GroupedExperts of `model` its per-expert packed products (after fuse_projections,
    so gate and up stay one product); returns how many layers were packed."""
    packed = 0
    for m in model.modules():
        if not isinstance(m, GroupedExperts) or getattr(m, "serve_products", None) is not None:
            continue
        names = ("w13", "w2") if m.w13 is not None else ("w1", "w3", "w2") if m.w3 is not None else ("w1", "w2")
        m.serve_products = {n: [PackedProduct(w) for w in getattr(m, n).detach()] for n in names}
        packed += 1
    return packed


@torch.no_grad()
def prepack_linears(model: nn.Module) -> int:
    """The dense products a serving step runs, on packed weights too: the stacked q/k/v
    (`serve_wqkv_product`, read by model/paged.py) and every bias-free nn.Linear other than
    wq/wk/wv when they are stacked (the output head, wo, the router, dense MLPs), whose forward
    becomes the packed product (hooks, such as tensor parallelism's sum over wo, still run).
    Returns how many were packed."""
    from moray.model.layers import Attention

    stacked = set()
    for m in model.modules():
        if isinstance(m, Attention) and getattr(m, "serve_wqkv", None) is not None:
            m.serve_wqkv_product = PackedProduct(m.serve_wqkv.t())
            stacked.update(id(lin) for lin in (m.wq, m.wk, m.wv))
    packed = len(stacked) // 3
    for m in model.modules():
        if (isinstance(m, nn.Linear) and m.bias is None and id(m) not in stacked
                and "forward" not in m.__dict__ and m.weight.dtype in (torch.float32, torch.bfloat16)):
            m.forward = PackedProduct(m.weight.detach().t())
            packed += 1
    return packed


def lay_out_for_serving(model: nn.Module, device: torch.device, fuse: bool = True) -> None:
    """Everything serving does to its copy of the weights, in order (the module doc says why).
    Packed products replace the grouped one, so experts are re-strided only where nothing is
    packed. fuse=False keeps wq/wk/wv and w1/w3 apart (a stage runner's tensor-parallel shards)."""
    dtype = next(model.parameters()).dtype
    packing = can_prepack(device, dtype)
    if not packing and wants_column_major_experts(device, dtype):
        column_major_experts(model)
    if fuse:
        fuse_projections(model)
    if packing:
        prepack_experts(model)
        prepack_linears(model)

