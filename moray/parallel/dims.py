"""The layout of one training job: how many ranks along each axis, and the meshes.

    world = pp x dp x tp          rank = (pp_i * dp + dp_i) * tp + tp_i
    dp    = edp x ep              dp_i = edp_i * ep + ep_i

Tensor parallelism is innermost (a TP group is consecutive ranks, so it packs
onto one node), then data parallelism, then pipeline stages. Expert
parallelism is carved out of data parallelism, as in torchtitan and Megatron:
the ep ranks of one expert group are ep consecutive dp ranks (each with its own
data) that split the experts between them; the dp / ep groups of such ranks
("edp") hold the same experts and average their gradients. ep over dp x tp
(experts also spread over tensor ranks) is not supported: ep must divide dp.

`ParallelDims` is plain Python so the controller validates a layout before any
worker starts; `build_mesh` is the only part that needs torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    edp: int  # which copy of the experts (dp // ep)


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    @classmethod
    def from_config(cls, parallel_cfg, world_size: int) -> "ParallelDims":
        """dp from the world size (ParallelConfig.resolved_dp checks it)."""
        p = parallel_cfg
        return cls(world_size=world_size, tp=p.tp, pp=p.pp, dp=p.resolved_dp(world_size), ep=p.ep)

    @property
    def edp(self) -> int:
        """Copies of each expert: the data-parallel ranks that share an expert shard."""
        return self.dp // self.ep

    def describe(self) -> Dict[str, int]:
        return {"world_size": self.world_size, "pp": self.pp, "dp": self.dp, "tp": self.tp, "ep": self.ep}

    # ------------------------------------------------------------ checks

    def validate(self, model_cfg: Optional[ModelConfig] = None, virtual_stages: int = 1) -> None:
        """Raise LayoutError naming every problem and what would fit; model checks need model_cfg.

        virtual_stages > 1 (interleaved 1F1B) needs pp * virtual_stages layers.
        """
        problems = self._layout_problems()
        if model_cfg is not None:
            problems += self._model_problems(model_cfg, virtual_stages)
        if problems:
            raise LayoutError("; ".join(problems))

    def _layout_problems(self) -> List[str]:
        problems = []
        for name in ("world_size", "tp", "pp", "dp", "ep"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                return [f"{name} must be a positive integer (got {getattr(self, name)!r})"]
        tpp = self.tp * self.pp
        if self.tp * self.pp * self.dp != self.world_size:
            if self.world_size % tpp:
                fit = f"with tp {self.tp} x pp {self.pp} the world size must be a multiple of {tpp} (e.g. {tpp}, {2 * tpp})"
            else:
                fit = f"use dp = {self.world_size // tpp}"
            problems.append(f"world size {self.world_size} != tp {self.tp} x pp {self.pp} x dp {self.dp}; {fit}")
        if self.dp % self.ep:
            problems.append(
                f"ep {self.ep} must divide dp {self.dp} (experts are spread over data-parallel ranks); "
                f"ep in {_divisors(self.dp)} fits dp {self.dp}"
            )
        return problems

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
            fit = [e for e in _divisors(self.dp) if cfg.n_experts % e == 0]
            problems.append(f"ep {self.ep} must divide n_experts {cfg.n_experts}; with dp {self.dp}, ep in {fit} fits")
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
        return Coords(pp=pp_i, dp=dp_i, tp=tp_i, ep=dp_i % self.ep, edp=dp_i // self.ep)

    def dp_rank(self, rank: int) -> int:
        return self.coords(rank).dp

    def pp_rank(self, rank: int) -> int:
        return self.coords(rank).pp

    # ------------------------------------------------------------ meshes

    def build_mesh(self, device_type: str) -> "Meshes":
        """The world mesh ("pp", "dp", "tp") and the expert mesh ("pp", "edp", "ep", "tp") over the
        same ranks. Collective: every rank calls it, after init_process_group."""
        import torch
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        self.validate()
        world = init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))
        ranks = torch.arange(self.world_size).view(self.pp, self.edp, self.ep, self.tp)
        expert = DeviceMesh(device_type, ranks, mesh_dim_names=("pp", "edp", "ep", "tp"))
        return Meshes(world=world, expert=expert)


@dataclass
class Meshes:
    world: "DeviceMesh"  # ("pp", "dp", "tp"): dense parameters, pipeline and tensor groups
    expert: "DeviceMesh"  # ("pp", "edp", "ep", "tp"): the same ranks with dp split as edp x ep

    def group(self, name: str):
        """The process group of this rank along one axis: pp, dp, tp, ep or edp."""
        mesh = self.world if name in ("pp", "dp", "tp") else self.expert
        return mesh[name].get_group()
