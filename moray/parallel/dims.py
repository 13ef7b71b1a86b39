"""The layout of one training job: how many ranks along each axis, and the meshes.

    world = pp x dp x tp          rank = (pp_i * dp + dp_i) * tp + tp_i

Tensor parallelism is innermost (a TP group is consecutive ranks, so it packs
onto one node), then data parallelism, then pipeline stages.

Experts have their own layout over the same ranks (Megatron-Core's expert
layout, torchtitan's etp): the dp x tp ranks of one pipeline stage, numbered
L = dp_i * tp + tp_i, are regrouped as

    dp x tp = edp x ep x etp      L = (edp_i * ep + ep_i) * etp + etp_i

- etp (expert tensor parallelism) ranks split every expert's FFN columns, as
  tp splits the dense MLP's; etp divides tp, so an etp group is part of one TP
  group. etp = tp (the default) is the classic layout: experts split like the
  rest of the block, and the ep ranks of an expert group are ep consecutive dp
  ranks at stride tp (carved out of dp: ep divides dp).
- ep (expert parallelism) ranks hold n_experts / ep experts each and exchange
  tokens by all-to-all. With etp < tp the expert group spans tensor ranks
  too: at etp = 1 its ep ranks are ep consecutive ranks (tp of them share a
  dp index), so an ep 8 group of a tp 8 job is one node, where at etp = tp it
  would cross 8 nodes. ep no longer has to divide dp, only ep x etp dp x tp.
- edp = dp x tp / (ep x etp) ranks hold the same expert shard (different
  data); expert gradients are summed over them and divided by dp (every
  token's gradient reaches exactly one copy), and ZeRO-1 shards the experts'
  optimizer state over them.

etp < tp needs sequence parallelism: the tensor ranks of a TP group must route
different tokens (their 1/tp of the sequence), or each token would reach the
experts tp / etp times. Dense parameters are reduced over dp (and, when only
a rank's tokens touch them under sequence parallelism, over tp first).

`ParallelDims` is plain Python so the controller validates a layout before any
worker starts; `build_mesh` is the only part that needs torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional

from moray.model.config import ModelConfig

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


class LayoutError(ValueError):
    """The layout does not fit the world or the model; the message says what would."""


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Coords:
    """Where one rank sits on every axis."""

    pp: int
    dp: int
    tp: int
    ep: int  # position inside its expert group
    edp: int  # which copy of the expert shard (edp ranks hold the same one)
    etp: int = 0  # position inside its expert-tensor group (= tp at etp = tp)


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # expert tensor parallelism; None = tp (experts split like the dense MLP)

    def __post_init__(self):
        if self.etp is None:  # resolved here, so dims built with or without it compare equal
            object.__setattr__(self, "etp", self.tp)

    @classmethod
    def from_config(cls, parallel_cfg, world_size: int) -> "ParallelDims":
        """dp from the world size (ParallelConfig.resolved_dp checks it)."""
        p = parallel_cfg
        return cls(world_size=world_size, tp=p.tp, pp=p.pp, dp=p.resolved_dp(world_size), ep=p.ep,
                   etp=getattr(p, "etp", None))

    @property
    def edp(self) -> int:
        """Copies of each expert shard: the ranks of a stage that hold the same experts."""
        return self.dp * self.tp // (self.ep * self.etp)

    def describe(self) -> Dict[str, int]:
        out = {"world_size": self.world_size, "pp": self.pp, "dp": self.dp, "tp": self.tp, "ep": self.ep}
        if self.etp != self.tp:  # the classic layout keeps its old description (events, manifests)
            out["etp"] = self.etp
        return out

    # ------------------------------------------------------------ checks

    def validate(self, model_cfg: Optional[ModelConfig] = None, virtual_stages: int = 1,
                 sequence_parallel: bool = False) -> None:
        """Raise LayoutError naming every problem and what would fit; model checks need model_cfg.

        virtual_stages > 1 (interleaved 1F1B) needs pp * virtual_stages layers; etp < tp needs
        sequence_parallel (the module doc says why).
        """
        problems = self._layout_problems()
        if self.etp < self.tp and not sequence_parallel and not problems and (model_cfg is None or model_cfg.is_moe):
            problems.append(f"etp {self.etp} < tp {self.tp} needs parallel.sequence_parallel=true: the tensor "
                            f"ranks must route different tokens, or each token would reach the experts "
                            f"{self.tp // self.etp} times; set sequence_parallel or etp {self.tp}")
        if model_cfg is not None:
            problems += self._model_problems(model_cfg, virtual_stages)
        if problems:
            raise LayoutError("; ".join(problems))

    def _layout_problems(self) -> List[str]:
        problems = []
        for name in ("world_size", "tp", "pp", "dp", "ep", "etp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                return [f"{name} must be a positive integer (got {getattr(self, name)!r})"]
        tpp = self.tp * self.pp
        if self.tp * self.pp * self.dp != self.world_size:
            if self.world_size % tpp:
                fit = f"with tp {self.tp} x pp {self.pp} the world size must be a multiple of {tpp} (e.g. {tpp}, {2 * tpp})"
            else:
                fit = f"use dp = {self.world_size // tpp}"
            problems.append(f"world size {self.world_size} != tp {self.tp} x pp {self.pp} x dp {self.dp}; {fit}")
        if self.tp % self.etp:
            problems.append(f"etp {self.etp} must divide tp {self.tp} (an expert-tensor group is part of a "
                            f"tensor-parallel group); etp in {_divisors(self.tp)} fits")
        elif self.etp == self.tp and self.dp % self.ep:
            problems.append(
                f"ep {self.ep} must divide dp {self.dp} (with etp = tp experts are spread over data-parallel "
                f"ranks); ep in {_divisors(self.dp)} fits dp {self.dp}"
                + (f", or etp 1 (with sequence parallelism) spreads them over tp x dp = {self.tp * self.dp} ranks"
                   if self.tp > 1 else "")
            )
        elif (self.dp * self.tp) % (self.ep * self.etp):
            problems.append(
                f"ep {self.ep} x etp {self.etp} must divide dp {self.dp} x tp {self.tp} (an expert group "
                f"spans tensor and data-parallel ranks); ep in {self.valid_ep()} fits"
            )
        return problems

    def valid_ep(self, n_experts: Optional[int] = None) -> List[int]:
        """Expert-parallel sizes this layout (tp, dp, etp) can use, and that divide n_experts if given."""
        ranks = self.dp * self.tp // self.etp if self.tp % self.etp == 0 else self.dp
        fit = _divisors(self.dp) if self.etp == self.tp else _divisors(ranks)
        return [e for e in fit if n_experts is None or n_experts % e == 0]

    def _model_problems(self, cfg: ModelConfig, virtual_stages: int) -> List[str]:
        problems = []
        stages = self.pp * virtual_stages
        if stages > cfg.n_layers:
            if virtual_stages > 1:
                fit = f"pp x virtual_stages <= {cfg.n_layers}, e.g. virtual_stages {max(1, cfg.n_layers // self.pp)}"
            else:
                fit = f"pp in 1..{cfg.n_layers}"
            problems.append(f"{stages} pipeline stages for {cfg.n_layers} layers: every stage needs a layer; use {fit}")
        if self.pp > 1 and cfg.tie_embeddings:
            problems.append("tie_embeddings with pp > 1 is not supported (the embedding and the head sit on "
                            "different stages); set model.tie_embeddings=false or pp=1")
        if self.ep > 1 and not cfg.is_moe:
            problems.append(f"ep {self.ep} needs experts but the model is dense (n_experts 1); use ep 1")
        elif cfg.n_experts % self.ep:
            fit = self.valid_ep(cfg.n_experts)
            where = f"dp {self.dp}" if self.etp == self.tp else f"dp {self.dp} x tp {self.tp} / etp {self.etp}"
            problems.append(f"ep {self.ep} must divide n_experts {cfg.n_experts}; with {where}, ep in {fit} fits")
        if self.tp > 1:
            fit = self.valid_tp(cfg)
            why = []
            if cfg.n_heads % self.tp:
                why.append(f"n_heads {cfg.n_heads}")
            if cfg.ffn_hidden % self.tp:
                why.append(f"ffn_hidden {cfg.ffn_hidden}")
            if cfg.n_kv_heads % self.tp and self.tp % cfg.n_kv_heads:
                why.append(f"n_kv_heads {cfg.n_kv_heads} (or be a multiple of it)")
            if why:
                problems.append(f"tp {self.tp} must divide {', '.join(why)}; tp in {fit} fits this model")
            rows = -(-cfg.vocab_size // self.tp)  # vocabulary rows per tensor rank, split as torch.chunk does
            if (self.tp - 1) * rows >= cfg.vocab_size:
                problems.append(f"tp {self.tp} leaves the last tensor rank no vocabulary rows (vocab_size "
                                f"{cfg.vocab_size} in chunks of {rows}); use a smaller tp or a larger vocabulary")
        return problems

    @staticmethod
    def valid_tp(cfg: ModelConfig) -> List[int]:
        """Tensor-parallel sizes this model can use: heads and FFN columns split evenly; K/V heads
        split evenly or (fewer KV heads than ranks, e.g. MQA) replicated."""
        return [t for t in _divisors(cfg.n_heads)
                if cfg.ffn_hidden % t == 0 and (cfg.n_kv_heads % t == 0 or t % cfg.n_kv_heads == 0)]

    # ------------------------------------------------------------ coordinates

    def coords(self, rank: int) -> Coords:
        tp_i = rank % self.tp
        dp_i = (rank // self.tp) % self.dp
        pp_i = rank // (self.tp * self.dp)
        local = dp_i * self.tp + tp_i  # = (edp_i * ep + ep_i) * etp + etp_i
        return Coords(pp=pp_i, dp=dp_i, tp=tp_i, ep=(local // self.etp) % self.ep,
                      edp=local // (self.etp * self.ep), etp=local % self.etp)

    def dp_rank(self, rank: int) -> int:
        return self.coords(rank).dp

    def pp_rank(self, rank: int) -> int:
        return self.coords(rank).pp

    # ------------------------------------------------------------ meshes

    def build_mesh(self, device_type: str) -> "Meshes":
        """The world mesh ("pp", "dp", "tp") and the expert mesh ("pp", "edp", "ep", "etp") over the
        same ranks. Collective: every rank calls it, after init_process_group."""
        import torch
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        problems = self._layout_problems()
        if problems:
            raise LayoutError("; ".join(problems))
        world = init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))
        ranks = torch.arange(self.world_size).view(self.pp, self.edp, self.ep, self.etp)
        expert = DeviceMesh(device_type, ranks, mesh_dim_names=("pp", "edp", "ep", "etp"))
        return Meshes(world=world, expert=expert)


@dataclass
class Meshes:
    world: "DeviceMesh"  # ("pp", "dp", "tp"): dense parameters, pipeline and tensor groups
    expert: "DeviceMesh"  # ("pp", "edp", "ep", "etp"): the same ranks, a stage's dp x tp as edp x ep x etp
    _extra: Dict[tuple, object] = field(default_factory=dict)  # groups made on demand (reduction_group)

    def group(self, name: str):
        """The process group of this rank along one axis: pp, dp, tp (world), ep, edp, etp (experts)."""
        mesh = self.world if name in ("pp", "dp", "tp") else self.expert
        return mesh[name].get_group()

    def reduction_group(self, *names: str):
        """A process group of its own over this rank's ranks along `names` (one axis, or several of
        one mesh: ("dp", "tp") is every rank of the stage), for gradient reduction only. Reductions
        run asynchronously during the backward while the model's own collectives (tensor and
        expert parallelism's) run on group(name); on groups of their own the two streams can never
        be matched against each other. Group ranks follow the mesh (row-major over `names`).
        Collective on first use: every rank asks for the same names in the same order."""
        if names not in self._extra:
            import torch.distributed as dist

            mesh = self.world if all(n in ("pp", "dp", "tp") for n in names) else self.expert
            dims = [mesh.mesh_dim_names.index(n) for n in names]
            others = [d for d in range(mesh.mesh.dim()) if d not in dims]
            size = 1
            for d in dims:
                size *= mesh.mesh.shape[d]
            rows = mesh.mesh.permute(*others, *dims).reshape(-1, size).tolist()  # every group of those axes
            mine = None
            for ranks in rows:  # new_group is collective over the world: every rank creates every group
                g = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    mine = g
            self._extra[names] = mine
        return self._extra[names]
