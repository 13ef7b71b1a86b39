"""How each local parameter relates to the whole model's: tags, specs, DTensor views.

Parameters are plain local tensors. The apply_* functions tag the modules they
split (`tag`); `param_specs` reads the tags back into one `ParamSpec` per
parameter, which everything else uses:

- the checkpoint: `to_dtensor` wraps a local shard (or its optimizer state) as a
  DTensor with the right placements, so DCP records where it sits in the whole
  tensor and reshards on load into another layout;
- gradient averaging and clipping: which group holds copies of this tensor
  (dense: dp; experts: the dp / ep ranks that hold the same experts), and whether
  its gradient is a partial sum over tensor ranks.

Placements: stacked experts are Shard(0) on the expert mesh's "ep" dim (and
Shard(F dim) on "etp" when expert tensor parallelism splits them; see dims.py);
tensor-parallel shards are Shard(dim) on the world mesh's "tp"; everything else
is a plain tensor, whole on every rank that holds it (DCP keeps one copy). A tp split may be uneven (the
vocabulary: 100,277 rows over 8 ranks): it follows torch.chunk, as DTensor's
Shard does, so rank r starts at r * ceil(n / tp) and the last ranks hold fewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from moray.model.moe import GroupedExperts
from moray.parallel.dims import Coords, Meshes, ParallelDims


@dataclass(frozen=True)
class ShardTag:
    tp_dim: Optional[int] = None  # split over the tp group along this dim
    tp_full: Optional[int] = None  # the whole size along tp_dim when the split is uneven (None: local x tp)
    tp_partial: bool = False  # whole on every tensor rank, gradient a partial sum over tp
    # (rank, size) in the group that split tp_dim when it is not the tp group: experts split over
    # their expert-tensor group (dims.py's etp); None = the tp group
    split: Optional[Tuple[int, int]] = None


def tag(module: nn.Module, param_name: str, **fields) -> None:
    module.__dict__.setdefault("_moray_shard", {})[param_name] = ShardTag(**fields)


@dataclass(frozen=True)
class ParamSpec:
    local_shape: Tuple[int, ...]
    global_shape: Tuple[int, ...]
    expert: bool  # stacked experts: dim 0 split over ep, copies over edp
    tp_dim: Optional[int]
    tp_partial: bool

    @property
    def replica_group(self) -> str:
        """The axis whose ranks hold identical copies (and average gradients)."""
        return "edp" if self.expert else "dp"


def param_specs(modules: Iterable[nn.Module], dims: ParallelDims) -> Dict[str, Tuple[nn.Parameter, ParamSpec]]:
    """fqn -> (parameter, spec) over this rank's model parts (FQNs are the whole model's).
    A tied parameter appears once, under its first name."""
    out: Dict[str, Tuple[nn.Parameter, ParamSpec]] = {}
    seen = set()
    for module in modules:
        for mod_name, mod in module.named_modules():
            tags = mod.__dict__.get("_moray_shard", {})
            for p_name, p in mod.named_parameters(recurse=False):
                fqn = f"{mod_name}.{p_name}" if mod_name else p_name
                if id(p) in seen:
                    continue
                seen.add(id(p))
                t = tags.get(p_name, ShardTag())
                expert = isinstance(mod, GroupedExperts)
                shape = list(p.shape)
                if expert:
                    shape[0] *= dims.ep
                if t.tp_dim is not None:  # experts split over the expert-tensor group, the rest over tp
                    ranks = dims.etp if expert else dims.tp
                    shape[t.tp_dim] = t.tp_full if t.tp_full is not None else shape[t.tp_dim] * ranks
                out[fqn] = (p, ParamSpec(tuple(p.shape), tuple(shape), expert, t.tp_dim, t.tp_partial))
    return out


def is_sharded(spec: ParamSpec) -> bool:
    return spec.local_shape != spec.global_shape


def _mesh_and_placements(spec: ParamSpec, meshes: Meshes):
    from torch.distributed.tensor import Replicate, Shard

    tp = Shard(spec.tp_dim) if spec.tp_dim is not None else Replicate()
    if spec.expert:
        return meshes.expert["ep", "etp"], (Shard(0), tp)
    return meshes.world["tp"], (tp,)


def to_dtensor(t: torch.Tensor, spec: ParamSpec, meshes: Meshes) -> torch.Tensor:
    """A DTensor view of the local shard `t` (same storage), or `t` itself when it is whole."""
    if not is_sharded(spec) or t.dim() == 0:
        return t
    from torch.distributed.tensor import DTensor

    mesh, placements = _mesh_and_placements(spec, meshes)
    # The global shape is given, not inferred: from_local would take local x ranks, wrong for an uneven split.
    stride = torch.empty(spec.global_shape, device="meta").stride()
    return DTensor.from_local(t, mesh, placements, run_check=False, shape=torch.Size(spec.global_shape),
                              stride=stride)


def chunk_start(full: int, size: int, rank: int) -> int:
    """Where rank's piece of `full` starts when split in `size` as torch.chunk (and DTensor) split."""
    return min(full, rank * -(-full // size))


def local_view(full: torch.Tensor, spec: ParamSpec, dims: ParallelDims, coords: Coords) -> torch.Tensor:
    """This rank's shard of a whole tensor (no copy)."""
    out = full
    if spec.expert and dims.ep > 1:
        n = spec.local_shape[0]
        out = out.narrow(0, coords.ep * n, n)
    ranks, rank = (dims.etp, coords.etp) if spec.expert else (dims.tp, coords.tp)
    if spec.tp_dim is not None and ranks > 1:
        start = chunk_start(spec.global_shape[spec.tp_dim], ranks, rank)
        out = out.narrow(spec.tp_dim, start, spec.local_shape[spec.tp_dim])
    return out


def full_tensor(t: torch.Tensor, spec: ParamSpec, meshes: Meshes) -> torch.Tensor:
    """The whole tensor from every rank's shard. Collective over the ranks that split it."""
    d = to_dtensor(t, spec, meshes)
    return d.full_tensor() if d is not t else t.detach().clone()
