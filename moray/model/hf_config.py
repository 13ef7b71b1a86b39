"""Hugging Face MixtralConfig <-> ModelConfig, for `moray.model.hf`. Imports only torch.

Reads both generations of config.json: transformers 4.x (`rope_theta`,
`rope_scaling`) and 5.x (`rope_parameters`); writes both, so either loads what
moray writes. Refuses, naming the key, what moray would compute differently.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, NoReturn, Optional, Tuple

import torch

from moray.model.config import ModelConfig, RopeScaling

# MixtralConfig's defaults (transformers 5.24), used for keys a config.json leaves out.
_HF_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=4096 * 32, initializer_range=0.02, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, sliding_window=None, num_experts_per_tok=2,
                    num_local_experts=8, router_aux_loss_coef=0.001, rope_theta=1e6)


def _fail(msg: str) -> NoReturn:
    raise ValueError(f"cannot represent this Mixtral config in moray: {msg}")


def _rope_from_hf(hf: dict, max_pos: int) -> Tuple[float, Optional[RopeScaling]]:
    # transformers 4.x: rope_theta + rope_scaling; 5.x: rope_parameters. A legacy rope_scaling
    # wins when both are present, as transformers 5.24 decides too.
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(rope.get("rope_theta") or hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
                  or _HF_DEFAULTS["rope_theta"])
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        _fail(f"partial_rotary_factor={rope['partial_rotary_factor']} (moray rotates whole heads)")
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(type="linear", factor=float(rope["factor"]))
    if kind == "yarn":
        original = int(rope.get("original_max_position_embeddings") or max_pos)
        factor = float(rope.get("factor") or max_pos / original)
        default_scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        att = rope.get("attention_factor")
        if att is not None and abs(att - default_scale) > 1e-9:
            _fail(f"yarn attention_factor={att} (moray uses 0.1*ln(factor)+1 = {default_scale:.6f})")
        if rope.get("mscale") and rope.get("mscale_all_dim"):
            _fail("yarn mscale/mscale_all_dim (DeepSeek-style) are not supported")
        if rope.get("truncate", True) is False:
            _fail("yarn truncate=false (moray rounds the correction range like the YaRN paper)")
        return theta, RopeScaling(type="yarn", factor=factor, original_max_seq_len=original,
                                  beta_fast=float(rope.get("beta_fast") or 32.0),
                                  beta_slow=float(rope.get("beta_slow") or 1.0))
    _fail(f"rope type {kind!r}; moray supports default, linear and yarn")


def config_from_hf(hf: dict) -> ModelConfig:
    """A Mixtral config.json (as a dict) -> ModelConfig; refuses what moray cannot compute the same way."""
    if hf.get("model_type", "mixtral") != "mixtral":
        _fail(f"model_type={hf.get('model_type')!r}, expected 'mixtral' (MixtralForCausalLM)")
    if hf.get("quantization_config"):
        _fail("the checkpoint is quantized; dequantize it to bf16/fp32 first")
    c = {**_HF_DEFAULTS, **{k: v for k, v in hf.items() if k in _HF_DEFAULTS}}
    if c["hidden_act"] != "silu":
        _fail(f"hidden_act={c['hidden_act']!r}; moray's gated experts are swiglu (silu)")
    max_pos = int(c["max_position_embeddings"])
    if c["sliding_window"] is not None and c["sliding_window"] < max_pos:
        _fail(f"sliding_window={c['sliding_window']} < max_position_embeddings={max_pos}: moray attends to the "
              "whole context; set sliding_window to null in config.json if full attention is what you want")
    if int(c["num_local_experts"]) < 2:
        _fail("num_local_experts < 2 (moray's n_experts=1 is a dense MLP without a router)")
    for key in ("attention_dropout", "router_jitter_noise"):
        if hf.get(key):
            warnings.warn(f"Mixtral {key}={hf[key]} is training-time noise that moray does not apply; ignored")
    theta, scaling = _rope_from_hf(hf, max_pos)
    extras = hf.get("moray") or {}  # moray-only fields that config_to_hf stashed
    return ModelConfig(
        vocab_size=int(c["vocab_size"]), d_model=int(c["hidden_size"]), n_layers=int(c["num_hidden_layers"]),
        n_heads=int(c["num_attention_heads"]),
        n_kv_heads=int(c["num_key_value_heads"] or c["num_attention_heads"]),
        head_dim=int(c["head_dim"]) if c["head_dim"] else None, ffn_hidden=int(c["intermediate_size"]),
        mlp="swiglu", n_experts=int(c["num_local_experts"]), top_k=int(c["num_experts_per_tok"]),
        capacity_factor=extras.get("capacity_factor"),  # HF Mixtral is dropless
        aux_loss_coef=float(c["router_aux_loss_coef"]),
        z_loss_coef=float(extras.get("z_loss_coef", 0.0)),  # Mixtral trains without a z-loss
        tie_embeddings=bool(c["tie_word_embeddings"]), max_seq_len=max_pos, rope_theta=theta,
        rope_scaling=scaling, norm_eps=float(c["rms_norm_eps"]), init_std=float(c["initializer_range"]),
    )


def config_to_hf(cfg: ModelConfig, dtype: Optional[torch.dtype] = None) -> dict:
    """ModelConfig -> a config.json dict that MixtralForCausalLM loads (4.x and 5.x keys both)."""
    if not cfg.is_moe:
        _fail("n_experts=1 is a dense model; Hugging Face Mixtral needs n_experts >= 2")
    if cfg.mlp != "swiglu":
        _fail(f"mlp={cfg.mlp!r}; Mixtral experts are swiglu")
    if not cfg.norm_topk_prob:  # MixtralConfig has no such field: its router always renormalises
        _fail("norm_topk_prob=false; Mixtral always rescales the top_k router weights to sum to 1, so the "
              "exported model would compute something else; export only models trained with norm_topk_prob=true")
    rope_params: Dict[str, object] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    legacy = None
    s = cfg.rope_scaling
    if s is not None:
        legacy = {"type": s.type, "rope_type": s.type, "factor": s.factor}
        if s.type == "yarn":
            legacy.update(original_max_position_embeddings=s.original_max_seq_len or int(cfg.max_seq_len / s.factor),
                          beta_fast=s.beta_fast, beta_slow=s.beta_slow)
        rope_params = {**{k: v for k, v in legacy.items() if k != "type"}, "rope_theta": cfg.rope_theta}
    out = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k,
        "router_aux_loss_coef": cfg.aux_loss_coef, "router_jitter_noise": 0.0, "output_router_logits": False,
        "sliding_window": None, "attention_dropout": 0.0, "use_cache": True,
        "rope_theta": cfg.rope_theta, "rope_scaling": legacy, "rope_parameters": rope_params,
        # Fields HF has no place for, so a round trip gives back the same ModelConfig.
        "moray": {"z_loss_coef": cfg.z_loss_coef, "capacity_factor": cfg.capacity_factor},
    }
    if dtype is not None:
        out["dtype"] = out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out
