"""Norm, rotary embeddings, attention and the KV cache: the dense parts of a block.

Pure torch. Rotary uses the rotate-half layout of Hugging Face Llama/Mixtral, so
their q/k weights load without a permutation.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from moray.model.config import ModelConfig, RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the compute dtype: bf16 variance loses too much.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


# ---------------------------------------------------------------- rotary


def _yarn_inv_freq(head_dim: int, theta: float, s: RopeScaling, max_seq_len: int) -> Tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate low-frequency dims, keep high-frequency ones.

    Same formulas as Hugging Face's `_compute_yarn_parameters`, so converted
    checkpoints extended with YaRN agree.
    """
    original = s.original_max_seq_len or int(max_seq_len / s.factor)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (s.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation_share = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_share) + extrapolation * extrapolation_share
    attention_scale = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
    return inv_freq, attention_scale


def rope_inv_freq(cfg: ModelConfig) -> Tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) in float64 and the cos/sin scale (YaRN's attention factor)."""
    hd, s = cfg.head_dim, cfg.rope_scaling
    if s is not None and s.type == "yarn":
        return _yarn_inv_freq(hd, cfg.rope_theta, s, cfg.max_seq_len)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if s is not None and s.type == "linear":
        inv_freq = inv_freq / s.factor  # positions / factor
    return inv_freq, 1.0


def rope_tables(cfg: ModelConfig, device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (max_seq_len, head_dim), in float32 (computed in float64)."""
    inv_freq, scale = rope_inv_freq(cfg)
    pos = torch.arange(cfg.max_seq_len, dtype=torch.float64)
    freqs = torch.outer(pos, inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd), rotate-half layout
    return (emb.cos() * scale).float().to(device), (emb.sin() * scale).float().to(device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hd); cos/sin: (T, hd) for the positions of x."""
    return (x * cos + _rotate_half(x) * sin).to(x.dtype)


# ---------------------------------------------------------------- KV cache


class KVCache(nn.Module):
    """Keys and values of past positions for incremental decoding (gpt-fast's shape).

    One KV head under MQA makes this small: 2 x layers x head_dim x bytes per token.
    """

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at positions input_pos (T,); return the whole cache."""
        self.k[:, :, input_pos] = k.to(self.k.dtype)
        self.v[:, :, input_pos] = v.to(self.v.dtype)
        return self.k, self.v


# ---------------------------------------------------------------- attention


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, T, D). Without input_pos, cos/sin are tables from position 0 (at least T rows) and
        the sequence is x's own: a block that holds a slice of the sequence between attentions
        (sequence parallelism) hands attention the gathered whole and the positions follow."""
        B, T, _ = x.shape
        if input_pos is None:
            cos, sin = cos[:T], sin[:T]  # (T, hd)
        # Head counts come from the weights, not the config, so a tensor-parallel
        # shard (fewer local heads) runs this same code.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = q.shape[1] != k.shape[1]
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, S, hd), S = cache length
            # Each query sees cache positions up to its own: prefill and decode alike.
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= input_pos[:, None]  # (T, S)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hd)
        return self.wo(y)
