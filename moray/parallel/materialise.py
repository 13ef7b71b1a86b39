"""Materialise a rank's part: from the meta device to real tensors, only this rank's share.

torchtitan's order: the part is built on `meta`, cut to its pipeline stage,
its experts and its tensor shards there (apply_ep, apply_tp,
apply_vocab_parallel slice meta tensors: no memory), and only then allocated
and initialised. Each parameter is allocated once, in the compute dtype, and
filled with its slice of the whole model's initial values (moray/model/init.py
replays each whole weight's random stream in pieces and keeps the slice), so a
rank never holds a whole-width weight, nor a float32 copy of a bf16 part:
building peaks at the final share plus one piece of random numbers
(tests/test_sharded_init.py measures it). The values equal the whole model's,
sliced, bit for bit, so every layout starts from the single process's weights.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from moray.model.init import Slice, init_parameters
from moray.parallel.sharding import chunk_start


def tp_slice(module: nn.Module, name: str, param: torch.Tensor, tp_rank: int, tp_size: int) -> Slice:
    """Where this rank's tensor shard of `module.name` sits in the whole weight (the tag that
    apply_tp / apply_vocab_parallel left: sharding.ShardTag), or None when it is whole."""
    tag = module.__dict__.get("_moray_shard", {}).get(name)
    if tag is None or tag.tp_dim is None or tp_size == 1:
        return None
    if tag.split is not None:  # split over another group than tp (experts over etp: sharding.ShardTag)
        tp_rank, tp_size = tag.split
    held = param.shape[tag.tp_dim]
    whole = tag.tp_full if tag.tp_full is not None else held * tp_size
    return tag.tp_dim, chunk_start(whole, tp_size, tp_rank), whole


def _allocate(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(t.shape, device=device, dtype=dtype if t.is_floating_point() else t.dtype)


@torch.no_grad()
def materialise(part: nn.Module, seed: int, device, dtype: torch.dtype = torch.float32, tp_rank: int = 0,
                tp_size: int = 1) -> nn.Module:
    """Allocate every parameter and buffer of `part` (a Transformer stage on meta, already sharded)
    on `device` in `dtype`, then initialise: buffers from the config, parameters from the whole
    model's rule restricted to the slice each holds. Tied parameters stay tied. In place."""
    device = torch.device(device)
    fresh: Dict[int, Tuple[torch.Tensor, nn.Parameter]] = {}  # id(meta) -> (meta kept alive, real)
    for module in part.modules():
        for name, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in fresh:
                fresh[id(p)] = (p, nn.Parameter(_allocate(p, device, dtype), requires_grad=p.requires_grad))
            module._parameters[name] = fresh[id(p)][1]
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[name] = _allocate(b, device, dtype)
    fresh.clear()
    part.init_buffers()
    init_parameters(part, seed, part.cfg.init_std,
                    slice_of=lambda module, name, p: tp_slice(module, name, p, tp_rank, tp_size))
    return part


def held_bytes(part: nn.Module, include_buffers: bool = True) -> int:
    """Bytes of the distinct parameters (and buffers) `part` holds: its final share."""
    seen, total = set(), 0
    tensors = list(part.parameters()) + (list(part.buffers()) if include_buffers else [])
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total

