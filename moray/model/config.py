"""The model's config section: a plain dataclass, so `moray.model` needs only torch.

Field names are a contract: YAML presets, `--set model.key=value`, the planner
and the Hugging Face converter all use them. `platform/config.py` validates this
dataclass with pydantic; `__pydantic_config__` is a plain dict so that nothing
here imports pydantic (the GPU machine has none).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Optional


@dataclass
class RopeScaling:
    """How rotary positions are stretched past the pre-training context."""

    type: Literal["linear", "yarn"] = "linear"
    factor: float = 1.0  # new context / original context
    # YaRN needs the context the model was trained at; None = model.max_seq_len / factor.
    original_max_seq_len: Optional[int] = None
    beta_fast: float = 32.0  # YaRN: rotations above which a dimension is left alone
    beta_slow: float = 1.0  # YaRN: rotations below which a dimension is fully interpolated

    __pydantic_config__ = {"extra": "forbid"}


@dataclass
class ModelConfig:
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 1  # 1 = multi-query attention (the seed's MQA); n_heads = plain MHA
    head_dim: Optional[int] = None  # None = d_model // n_heads
    ffn_hidden: int = 256  # hidden width of ONE expert (or of the dense MLP)
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    n_experts: int = 1  # 1 = dense feed-forward
    top_k: int = 2  # experts per token; ignored when n_experts == 1
    capacity_factor: Optional[float] = None  # None = dropless; else slots = cf * tokens * top_k / experts
    aux_loss_coef: float = 0.01  # Switch-Transformer load-balancing loss weight
    z_loss_coef: float = 0.001  # ST-MoE router z-loss weight (keeps router logits small)
    tie_embeddings: bool = False  # share token embedding and output projection
    max_seq_len: int = 256  # longest position the rotary tables and KV cache cover
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    norm_eps: float = 1e-5
    init_std: float = 0.02  # normal init of every weight matrix

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"model.d_model ({self.d_model}) is not divisible by model.n_heads "
                    f"({self.n_heads}); set model.head_dim explicitly or change n_heads"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                f"({self.n_kv_heads}): each KV head serves a whole group of query heads"
            )
        if self.n_experts > 1 and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"model.top_k ({self.top_k}) must be between 1 and model.n_experts ({self.n_experts})"
            )

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    @property
    def active_experts(self) -> int:
        return self.top_k if self.is_moe else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Plain construction for callers without pydantic (GPU benchmarks)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model keys {unknown}; allowed: {sorted(known)}")
        return cls(**d)
