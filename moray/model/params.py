"""Parameter counts from the config alone: no tensors, so the planner can size a 1.8T model.

`tests/test_model.py` checks these against `sum(p.numel())` of a built model.
"""

from __future__ import annotations

from dataclasses import dataclass

from moray.model.config import ModelConfig


@dataclass(frozen=True)
class ParamCount:
    embedding: int  # token embedding (+ output projection when untied)
    attention: int  # q, k, v, o projections over all layers
    experts: int  # every expert's FFN weights over all layers (the dense MLP when n_experts == 1)
    router: int  # router (gate) weights over all layers
    norms: int  # RMSNorm weights
    active_experts: int  # the expert weights one token passes through

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.experts + self.router + self.norms

    @property
    def active(self) -> int:
        """Parameters one token touches: everything but the experts it is not routed to."""
        return self.embedding + self.attention + self.active_experts + self.router + self.norms


def attention_params_per_layer(cfg: ModelConfig) -> int:
    q = cfg.d_model * cfg.n_heads * cfg.head_dim
    kv = 2 * cfg.d_model * cfg.n_kv_heads * cfg.head_dim
    o = cfg.n_heads * cfg.head_dim * cfg.d_model
    return q + kv + o


def expert_params(cfg: ModelConfig) -> int:
    """One expert (or the dense MLP): swiglu has gate, up and down; gelu has up and down."""
    mats = 3 if cfg.mlp == "swiglu" else 2
    return mats * cfg.d_model * cfg.ffn_hidden


def count_params(cfg: ModelConfig) -> ParamCount:
    L = cfg.n_layers
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    per_expert = expert_params(cfg)
    router = L * cfg.d_model * cfg.n_experts if cfg.is_moe else 0
    norms = (2 * L + 1) * cfg.d_model
    return ParamCount(
        embedding=embed,
        attention=L * attention_params_per_layer(cfg),
        experts=L * cfg.n_experts * per_expert,
        router=router,
        norms=norms,
        active_experts=L * cfg.active_experts * per_expert,
    )
