"""FLOPs as the papers count them, and the MFU the trainer reports.

- Forward FLOPs per token = 2 x active parameters (one multiply-add per weight
  a token meets) + the attention-score term 4 x layers x heads x head_dim x
  context (QK^T and attention x V, each 2 x context x head_dim per head).
  This is PaLM's definition (Chowdhery et al. 2022, appendix B: training =
  6N + 12 L H Q T per token); like PaLM it counts the whole T x T score matrix,
  not the causal half a flash kernel actually computes, and counts the input
  embedding as if it were a product (2 x vocab x d_model: 0.5% of GPT-4's).
- Training = 3 x forward (backward is twice the forward).
- `training_flops` is the papers' 6 x N x D (Kaplan et al. 2020; GPT-3's
  3.14e23 for 175B on 300B tokens), which leaves attention out.
"""

from __future__ import annotations

from moray.model.config import ModelConfig
from moray.model.params import count_params


def attention_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs of attention scores and the weighted sum for one token seeing `context` positions."""
    return 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token at sequence length (or decode context) `seq_len`."""
    return 2.0 * count_params(cfg).active + attention_flops_per_token(cfg, seq_len)


def training_flops(cfg: ModelConfig, tokens: float) -> float:
    """6 x active parameters x tokens: the count papers report (attention left out)."""
    return 6.0 * count_params(cfg).active * tokens


def training_flops_with_attention(cfg: ModelConfig, tokens: float, seq_len: int) -> float:
    """3 x forward FLOPs (attention-score term included) x tokens: what MFU measures against."""
    return 3.0 * flops_per_token(cfg, seq_len) * tokens


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, n_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation (PaLM): training FLOPs achieved / peak of all devices."""
    return 3.0 * flops_per_token(cfg, seq_len) * tokens_per_s / (n_devices * peak_flops_per_device)


def pipeline_bubble(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle share of a pipeline step: (p-1)/(m+p-1) for 1F1B and GPipe (Narayanan et al. 2021);
    interleaved 1F1B with v stages per rank: (p-1)/(v m + p-1). The trainer's own formula,
    moray.parallel.pipeline.bubble_fraction, so the two cannot drift apart."""
    from moray.parallel.pipeline import bubble_fraction

    if pp < 1 or microbatches < 1 or virtual_stages < 1:
        raise ValueError(f"pp, microbatches and virtual_stages must be >= 1 (got {pp}, {microbatches}, {virtual_stages})")
    return bubble_fraction(pp, microbatches, virtual_stages)
