"""One serving rank's part of the model: its pipeline stage, its experts, its tensor shard.

A serving gang is pp x ep x tp ranks (`ServeLayout`). Ranks are numbered as training numbers
them (dims.py: tp innermost, then ep, then pp), with serving's data-parallel axis being the
expert axis: there are no model replicas inside a gang, so every "dp" rank of a stage is an
expert shard. Building follows training's order (engine.build_model_parts), forward only and
from stored weights instead of an init, and all of the cutting happens on the meta device:
the whole Transformer on meta -> keep_stage -> apply_ep -> apply_tp, which leave each
parameter at its shard's shape and tagged as sharding.py describes it -> `shard_regions`
turns the tags into the piece of each stored tensor this rank holds (expert rows, tensor-
parallel columns) -> loader.materialise reads just those pieces (src.read: a safetensors
slice, a Hugging Face directory's own experts only, DCP asked for the pieces), so a rank reads
about its share of the weights, never a whole layer.

Two things the training forward does through module hooks need help in the paged path
(moray/model/paged.py), both added here from outside the model:

- TP attention. `paged._attention_step` calls wq/wk/wv/wo itself, not Attention.forward, so
  the all-reduce apply_tp hangs on the Attention module never fires. A forward hook on `wo`
  (a row shard: each rank holds a partial sum) all-reduces its output over the tp group.
  MLPs and experts are called as modules, so their tp reductions do fire. The stage is for
  the paged forward only: Attention.forward would now reduce twice.
- EP. Activations are replicated across a stage's ep ranks: attention runs on every ep rank,
  each with its own copy of the stage's KV cache (MQA keeps it small), so nothing but the
  MoE needs the ep group. Each MoE layer becomes a `TokenSlicedMoE`: ep rank r routes the
  contiguous slice r of the step's T tokens (uneven slices allowed, empty ones too: a batch-1
  decode at ep 2 gives rank 1 nothing, and it still joins the all-to-alls, since its experts
  serve the other rank's tokens), runs ParallelExperts' dropless all-to-all on it, and the
  rows are all-gathered so every ep rank has all T outputs. The router counts are summed over
  the ep group, so `moe_step_stats` sees whole counts on every rank. Replicating attention
  trades compute (ep copies of it) for no extra exchange on the way in and a KV cache that
  needs no routing; with a capacity factor, which tokens drop depends on the slice, as it
  already depends on the batch in the in-process engine.

`stage_report` models the same numbers without torch.distributed, for the planner and tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from moray.model.config import ModelConfig
from moray.model.moe import MoE
from moray.model.transformer import Transformer
from moray.parallel.dims import Coords, LayoutError, ParallelDims
from moray.parallel.expert_parallel import apply_ep
from moray.parallel.pipeline import keep_stage, partition_layers
from moray.parallel.sharding import param_specs
from moray.parallel.tensor_parallel import apply_tp


@dataclass(frozen=True)
class ServeLayout:
    """How one serving gang splits the model: pp stages x ep expert shards x tp tensor shards."""

    pp: int = 1
    tp: int = 1
    ep: int = 1

    @property
    def world_size(self) -> int:
        return self.pp * self.ep * self.tp

    def dims(self) -> ParallelDims:
        """Training's dims with dp = ep: serving's data-parallel axis is the expert axis."""
        return ParallelDims(world_size=self.world_size, tp=self.tp, pp=self.pp, dp=self.ep, ep=self.ep)

    def validate(self, model_cfg: Optional[ModelConfig] = None) -> None:
        """LayoutError naming what does not fit (pp <= layers, ep | n_experts, tp | heads and FFN)."""
        cfg = model_cfg
        if cfg is not None and cfg.is_moe and isinstance(self.ep, int) and self.ep >= 1 and cfg.n_experts % self.ep:
            fit = [e for e in range(1, cfg.n_experts + 1) if cfg.n_experts % e == 0]
            raise LayoutError(f"serving ep {self.ep} must divide n_experts {cfg.n_experts}; ep in {fit} fits")
        try:
            self.dims().validate(cfg)
        except LayoutError as e:
            raise LayoutError(f"serving layout pp {self.pp} x ep {self.ep} x tp {self.tp}: {e}") from None

    def coords(self, rank: int) -> Coords:
        return self.dims().coords(rank)

    def rank_of(self, stage: int, ep: int = 0, tp: int = 0) -> int:
        return (stage * self.ep + ep) * self.tp + tp


def stage_layers(model_cfg: ModelConfig, pp: int) -> List[range]:
    """Global layer ids per stage: training's split (cost-balanced, the ends pay for embedding and head)."""
    return partition_layers(model_cfg, pp)


# ---------------------------------------------------------------- building


def build_stage(src, layout: ServeLayout, rank: int, tp_group, ep_group, dtype: Optional[torch.dtype],
                device) -> Transformer:
    """This rank's stage from a weight source (moray.platform.weights), ready for forward_paged."""
    from moray.serve.engine.loader import materialise  # reads the weights: only where a stage is built

    model = materialise(src, dtype, device, stage_cut(src.cfg, layout, rank, tp_group, ep_group))
    model.requires_grad_(False)
    if layout.tp > 1:
        reduce_attention_over_tp(model, tp_group)
    if layout.ep > 1:
        slice_moe_tokens(model, ep_group, layout.coords(rank).ep, layout.ep)
    from moray.serve.engine.layout import lay_out_for_serving

    lay_out_for_serving(model, torch.device(device), fuse=False)  # as the in-process executor does
    return model.eval()


def stage_cut(cfg: ModelConfig, layout: ServeLayout, rank: int, tp_group=None, ep_group=None
              ) -> Callable[[Transformer], Dict[str, Tuple[slice, ...]]]:
    """What materialise runs on the meta model: cut it down to `rank`'s stage, experts and tensor
    shard, and return the piece of each stored tensor the rank keeps. The groups are only kept for
    the forward pass, so without them (None) this says what a rank would read, in one process."""
    c = layout.coords(rank)
    layers = stage_layers(cfg, layout.pp)[c.pp]

    def cut(model: Transformer) -> Dict[str, Tuple[slice, ...]]:
        keep_stage(model, layers, first=c.pp == 0, last=c.pp == layout.pp - 1)
        apply_ep(model, ep_group, c.ep, layout.ep)
        apply_tp(model, tp_group, c.tp, layout.tp)
        return shard_regions(model, layout, rank)

    return cut


def shard_regions(model: nn.Module, layout: ServeLayout, rank: int) -> Dict[str, Tuple[slice, ...]]:
    """name -> the slices of the whole stored tensor that `model`'s (sharded) parameter is, for each
    parameter apply_ep / apply_tp narrowed (sharding.local_view's rule, as slices to read)."""
    dims, c = layout.dims(), layout.coords(rank)
    out = {}
    for name, (p, spec) in param_specs([model], dims).items():
        if spec.local_shape == spec.global_shape:
            continue
        region = [slice(0, n) for n in spec.global_shape]
        if spec.expert and dims.ep > 1:
            n = spec.local_shape[0]
            region[0] = slice(c.ep * n, (c.ep + 1) * n)
        if spec.tp_dim is not None and dims.tp > 1:  # torch.chunk's split, as DTensor's Shard: even or not
            full, n = spec.global_shape[spec.tp_dim], spec.local_shape[spec.tp_dim]
            start = min(full, c.tp * -(-full // dims.tp))
            region[spec.tp_dim] = slice(start, start + n)
        out[name] = tuple(region)
    return out


def reduce_attention_over_tp(model: Transformer, group) -> None:
    """Sum each block's `wo` partial outputs over the tp group (see the module docstring)."""
    def hook(module, args, out):
        dist.all_reduce(out, group=group)
        return out

    for block in model.layers.values():
        block.attention.wo.register_forward_hook(hook)


def slice_moe_tokens(model: Transformer, group, rank: int, size: int) -> None:
    for block in model.layers.values():
        if isinstance(block.feed_forward, MoE):
            block.feed_forward = TokenSlicedMoE(block.feed_forward, group, rank, size)


def split_sizes(n: int, parts: int) -> List[int]:
    """Contiguous, as even as possible, the first ones one longer (tensor_split's rule)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


class TokenSlicedMoE(MoE):
    """An MoE layer whose ep ranks each route one slice of the tokens; outputs gathered whole.

    The same module state as the MoE it wraps (parameter names unchanged: gate, experts.w1...),
    so checkpoints, `moe_step_stats` and isinstance(MoE) see no difference."""

    def __init__(self, moe: MoE, group, rank: int, size: int):
        nn.Module.__init__(self)
        self.__dict__.update(moe.__dict__)  # share its parameters, submodules and settings
        self.ep_group, self.ep_rank, self.ep_size = group, rank, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])  # (T, D)
        sizes = split_sizes(xf.shape[0], self.ep_size)
        start = sum(sizes[:self.ep_rank])
        mine = xf[start:start + sizes[self.ep_rank]]  # (T_r, D)
        y = super().forward(mine) if mine.shape[0] else self._forward_empty(mine)
        dist.all_reduce(self.last_stats["tokens_per_expert"], group=self.ep_group)
        return _gather_rows(y, sizes, self.ep_group).view(shape)

    def _forward_empty(self, x: torch.Tensor) -> torch.Tensor:
        """No tokens here (MoE.forward cannot reshape zero rows), but the experts still serve the
        group: join both all-to-alls with nothing to send."""
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device)
        y = self.experts(x, counts)  # (0, D)
        nan = torch.tensor(float("nan"), device=x.device)
        self.last_stats = {"load_balancing_loss": nan, "z_loss": nan, "tokens_per_expert": counts,
                           "dropped": torch.tensor(0)}
        return y.to(x.dtype)


def _gather_rows(y: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """Each rank's rows (sizes[r] of them) -> all of them, in rank order, on every rank."""
    width = max(sizes)
    padded = y if y.shape[0] == width else torch.cat([y, y.new_zeros(width - y.shape[0], y.shape[1])])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


# ---------------------------------------------------------------- modelled sizes


def stage_report(model_cfg: ModelConfig, layout: ServeLayout, dtype_bytes: int = 2) -> List[dict]:
    """Per stage: its layers, and per rank its parameters, weight bytes and KV cache bytes per token.
    Every rank of a stage holds the same amount (experts and shards split evenly)."""
    layout.validate(model_cfg)
    cfg, out = model_cfg, []
    for s, layers in enumerate(stage_layers(cfg, layout.pp)):
        params = _rank_params(cfg, layout, len(layers), first=s == 0, last=s == layout.pp - 1)
        kv = 2 * len(layers) * _kv_heads_per_rank(cfg, layout.tp) * cfg.head_dim * dtype_bytes
        out.append({"stage": s, "layers": list(layers), "n_layers": len(layers), "params": params,
                    "weight_bytes": params * dtype_bytes, "kv_bytes_per_token": kv})
    return out


def _kv_heads_per_rank(cfg: ModelConfig, tp: int) -> int:
    """Its share of the KV heads, or (fewer KV heads than ranks) the one its query heads use."""
    return cfg.n_kv_heads // tp if cfg.n_kv_heads % tp == 0 else 1


def _rank_params(cfg: ModelConfig, layout: ServeLayout, n_layers: int, first: bool, last: bool) -> int:
    d, hd, tp = cfg.d_model, cfg.head_dim, layout.tp
    q_rows = cfg.n_heads * hd // tp  # wq's rows, wo's columns
    kv_rows = cfg.n_kv_heads * hd // tp if cfg.n_kv_heads % tp == 0 else cfg.n_kv_heads * hd  # ReplicatedKV: whole
    mats = 3 if cfg.mlp == "swiglu" else 2
    expert = mats * d * cfg.ffn_hidden // tp
    ffn = d * cfg.n_experts + cfg.n_experts // layout.ep * expert if cfg.is_moe else expert
    per_layer = 2 * d * q_rows + 2 * d * kv_rows + ffn + 2 * d  # + the two norms
    table = cfg.vocab_size * d
    total = n_layers * per_layer + (table if first else 0)
    if last:
        total += d + (0 if cfg.tie_embeddings and first else table)  # final norm, head (tied: the embedding)
    return total


__all__ = ["ServeLayout", "TokenSlicedMoE", "build_stage", "shard_regions", "split_sizes", "stage_cut",
           "stage_layers", "stage_report"]
