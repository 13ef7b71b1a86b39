"""Activations: the tensors autograd saves for backward, in bytes per token.

Counted tensor by tensor from moray.model's code: a float32 forward of
configs/tiny.yaml saves exactly what `layer_activation_bytes` counts, 15,760
bytes per token per block (tests/test_planner.py measures it). Tensor
parallelism leaves token-sized tensors whole on every tensor rank unless
`sequence_parallel` splits them (off by default: DTensor's Colwise/Rowwise
plans alone do not). 1F1B keeps min(pp - s, m) microbatches in flight on
stage s; activation checkpointing keeps each block's input and recomputes one
block at a time in backward.
"""

from __future__ import annotations

from moray.model.config import ModelConfig
from moray.platform.planner.errors import PlanError

INDEX_BYTES = 8  # int64 token ids and routing indices
STAT_BYTES = 4  # norms' rstd, router logits and probabilities, logsumexp: float32 in every dtype


def kv_heads_per_rank(n_kv_heads: int, tp: int) -> int:
    """KV heads a tensor rank computes: its share, or the one its query heads use."""
    if n_kv_heads % tp == 0:
        return n_kv_heads // tp
    if tp % n_kv_heads == 0:
        return 1
    raise PlanError(f"n_kv_heads={n_kv_heads} and tp={tp}: one must divide the other")


def layer_activation_bytes(cfg: ModelConfig, tp: int, act: int, sequence_parallel: bool = False) -> float:
    """Bytes one block saves for backward, per token of a microbatch, on one tensor rank.

    RMSNorm (normalises in float32): its float32 input (the input itself in a
    float32 run, a copy in bf16), rstd, the normalised x, and the weighted
    output the next projections save: 4d + 2ad + 4, twice per block.
    Attention (SDPA flash path, K/V at KV-head size): q, k, v, the output
    (which o-proj reads as a view) and float32 logsumexp per head.
    MoE: router logits and probabilities, top-k values, their sum, logsumexp
    (z-loss), the routed weights (float32) and four int64 index vectors; per
    routed copy of a token: the gathered input, the SwiGLU intermediates
    (gate, silu(gate), up, their product; GELU: two), the expert output and the
    weighted output. Capacity < 1 shrinks the routed copies.
    Sequence parallelism (Korthikanti et al. 2022) splits the norms' tensors and
    the routing over the tensor ranks; the experts' inputs stay gathered.
    """
    d, hd = cfg.d_model, cfg.head_dim
    heads = cfg.n_heads / tp
    kv = kv_heads_per_rank(cfg.n_kv_heads, tp)
    token_split = tp if sequence_parallel else 1
    norm = (4 * d + 2 * act * d + STAT_BYTES) / token_split
    attention = act * (2 * heads * hd + 2 * kv * hd) + STAT_BYTES * heads
    hidden_tensors = 4 if cfg.mlp == "swiglu" else 2
    if not cfg.is_moe:
        return 2 * norm + attention + act * hidden_tensors * cfg.ffn_hidden / tp
    E, k = cfg.n_experts, cfg.top_k
    routed = k * min(1.0, cfg.capacity_factor or 1.0)  # routed copies per token
    router = (STAT_BYTES * (2 * E + k + 2) + INDEX_BYTES * k) / token_split
    dispatch = routed * (STAT_BYTES + 3 * INDEX_BYTES)
    experts = routed * act * (3 * d + hidden_tensors * cfg.ffn_hidden / tp)
    return 2 * norm + attention + router + dispatch + experts


def stage_extra_activation_bytes(cfg: ModelConfig, tp: int, act: int, first: bool, last: bool,
                                 sequence_parallel: bool = False) -> float:
    """Per token, outside the blocks: token ids on the first stage; the final
    norm and the loss's float32 log-probabilities on the last;
    the received input on later stages when it is not float32 (a float32 input
    is the first norm's saved input already)."""
    token_split = tp if sequence_parallel else 1
    extra = 0.0
    if first:
        extra += INDEX_BYTES
    elif act != 4:
        extra += act * cfg.d_model / token_split
    if last:
        extra += (4 * cfg.d_model + 2 * act * cfg.d_model + STAT_BYTES) / token_split
        extra += STAT_BYTES * cfg.vocab_size  # the head is whole on every tensor rank
    return extra


def microbatches_in_flight(schedule: str, pp: int, stage: int, microbatches: int, virtual_stages: int = 2) -> float:
    """Microbatches whose activations a stage holds at its peak."""
    if schedule == "gpipe":
        return microbatches
    held = min(pp - stage, microbatches)
    if schedule == "interleaved_1f1b" and pp > 1:
        # Narayanan et al. 2021: the interleaved warm-up holds (1 + (p-1)/(p v)) x as much.
        return min(microbatches, held * (1 + (pp - 1) / (pp * virtual_stages)))
    return held
