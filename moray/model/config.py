"""The model's config section: a plain dataclass, so `moray.model` needs only torch.

Field names are a contract: YAML presets, `--set model.key=value`, the planner
and the Hugging Face converter all use them. `platform/config.py` validates this
dataclass with pydantic; `__pydantic_config__` is a plain dict so that nothing
here imports pydantic (the GPU machine has none).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints


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
    # Rescale the top_k router probabilities to sum to 1 (Mixtral does). At top_k 1 that makes the
    # weight exactly 1 and the router gets no gradient from the LM loss, so top-1 (Switch) uses the
    # raw probability: set false there.
    norm_topk_prob: bool = True
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
            self.rope_scaling = _typed(RopeScaling, self.rope_scaling, "model.rope_scaling")
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "n_experts",
                    "top_k", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be at least 1 (got {getattr(self, key)})")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"model.d_model ({self.d_model}) is not divisible by model.n_heads "
                    f"({self.n_heads}); set model.head_dim explicitly or change n_heads"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"model.head_dim must be even and positive: rotary pairs up dimensions (got {self.head_dim})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                f"({self.n_kv_heads}): each KV head serves a whole group of query heads"
            )
        if self.n_experts > 1 and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(
                f"model.top_k ({self.top_k}) must be between 1 and model.n_experts ({self.n_experts})"
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"model.capacity_factor must be positive, or null for dropless (got {self.capacity_factor})")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("model.norm_eps and model.rope_theta must be positive")
        if self.rope_scaling is not None and self.rope_scaling.factor <= 0:
            raise ValueError(f"model.rope_scaling.factor must be positive (got {self.rope_scaling.factor})")

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
        """Checked construction for callers without pydantic (GPU benchmarks, checkpoint dirs).

        Same contract as the pydantic path: errors name the key, unknown keys list the allowed ones.
        """
        return _typed(cls, d, "model")


def _typed(cls, d: dict, path: str):
    """Build dataclass `cls` from `d`, checking keys and plain types (int, float, bool, str, Literal)."""
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping, got {d!r}")
    hints = get_type_hints(cls)
    unknown = sorted(set(d) - set(cls.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{path}.{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(cls.__dataclass_fields__))}")
    values = {}
    for key, value in d.items():
        tp, optional = hints[key], False
        if get_origin(tp) is Union:
            args = [a for a in get_args(tp) if a is not type(None)]
            tp, optional = args[0], True
        where = f"{path}.{key}"
        if value is None and optional:
            pass
        elif tp is RopeScaling:
            value = value if isinstance(value, RopeScaling) else _typed(RopeScaling, value, where)
        elif get_origin(tp) is Literal:
            if value not in get_args(tp):
                raise ValueError(f"{where}: must be one of {', '.join(map(repr, get_args(tp)))} (got {value!r})")
        elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ValueError(f"{where}: expected {tp.__name__}{' or null' if optional else ''}, got {value!r}")
        values[key] = value
    return cls(**values)
