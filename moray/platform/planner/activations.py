"""Activations: the tensors autograd saves for backward, in bytes per token.

Counted tensor by tensor from moray.model's code and moray.parallel's layers: a
float32 forward of configs/tiny.yaml saves what `layer_activation_bytes` counts,
15,744 bytes per token per block, plus a few index and statistics vectors per
layer that do not grow with the tokens (E router shares, grouped-product
offsets: 64 bytes here); tests/test_planner.py measures the single process and
tests/test_parallel.py every tensor-parallel layout, sequence-parallel or not.

Tensor parallelism (the trainer's, moray/parallel) splits heads and FFN columns
and, at tp > 1, the vocabulary: the head's logits and the loss's probabilities
are 1/tp per rank (vocab_parallel.py). Token-sized tensors stay whole on every
tensor rank unless `sequence_parallel` splits them: then the residual stream,
the norms, the router and the routing bookkeeping hold 1/tp of the tokens, while
what a TP region gathers (attention's input, a dense MLP's, the head's) and the
rows the experts run stay whole. The gathered input is kept as it is for
backward, not re-gathered there as Megatron-LM does (a*d bytes per token per
region; re-gathering would trade an all-gather in backward for it).
1F1B keeps min(pp - s, m) microbatches in flight on stage s; activation
checkpointing keeps each checkpointed block's input and recomputes one block at
a time in backward; selective recomputation (recompute: attention) drops only
what attention saved, and recompute_every k checkpoints one block in k.
"""

from __future__ import annotations

from moray.model.config import ModelConfig
from moray.platform.planner.errors import PlanError

INDEX_BYTES = 8  # int64 token ids and routing indices
STAT_BYTES = 4  # norms' rstd, router logits and probabilities, logsumexp: float32 in every dtype
MASK_BYTES = 1  # bool


def kv_heads_per_rank(n_kv_heads: int, tp: int) -> int:
    """KV heads a tensor rank computes: its share, or the one its query heads use."""
    if n_kv_heads % tp == 0:
        return n_kv_heads // tp
    if tp % n_kv_heads == 0:
        return 1
    raise PlanError(f"n_kv_heads={n_kv_heads} and tp={tp}: one must divide the other")


def norm_bytes(d: int, act: int, tp: int, sequence_parallel: bool, output_gathered: bool) -> float:
    """RMSNorm (normalises in float32): its float32 input (the input itself in a float32 run, a
    copy in bf16), rstd, the normalised x in the compute dtype, and its output as the next layer
    saves it: whole (4d + 2ad + 4), or under sequence parallelism 1/tp of all that, except an
    output that a TP region gathers, which the region's projections save whole."""
    if not sequence_parallel:
        return 4 * d + 2 * act * d + STAT_BYTES
    if output_gathered:
        return (4 * d + act * d + STAT_BYTES) / tp + act * d
    return (4 * d + 2 * act * d + STAT_BYTES) / tp


def attention_activation_bytes(cfg: ModelConfig, tp: int, act: int) -> float:
    """What attention saves per token on one tensor rank (SDPA flash path, K/V at KV-head size):
    q, k, v, the output (which o-proj reads as a view) and float32 logsumexp per head. This is
    what selective recomputation (parallel.recompute: attention) drops and rebuilds."""
    heads = cfg.n_heads / tp
    kv = kv_heads_per_rank(cfg.n_kv_heads, tp)
    return act * (2 * heads * cfg.head_dim + 2 * kv * cfg.head_dim) + STAT_BYTES * heads


def layer_activation_bytes(cfg: ModelConfig, tp: int, act: int, sequence_parallel: bool = False,
                           ep: int = 1, etp: int | None = None) -> float:
    """Bytes one block saves for backward, per token of a microbatch, on one tensor rank.

    Norms: norm_bytes, twice per block (a MoE's norm output is routed where it is, not gathered).
    Attention (SDPA flash path, K/V at KV-head size): q, k, v, the output (which o-proj reads as
    a view) and float32 logsumexp per head.
    MoE, per token: router logits and probabilities, top-k values, their sum, logsumexp (z-loss)
    and the top-k indices. Per routed copy: the routed weight and two int64 indices (gather,
    combine); the gathered input, the SwiGLU intermediates (gate, silu(gate), up, their product;
    GELU: two), the expert output and the weighted output. Regrouping rows that arrive from
    several sources (ep > 1, or the expert-tensor ranks under sequence parallelism) keeps two
    int64 indices per row. Sequence parallelism splits the router and the per-copy bookkeeping
    over tp; the experts run every routed row of their expert-tensor group (etp ranks, None = tp:
    gathered over it), each with its F / etp columns, so a rank runs etp / tp of the routed copies
    (all of them without sequence parallelism, where etp = tp), while the output and its weighted
    copy are this rank's rows. Capacity < 1 shrinks the routed copies.
    """
    d = cfg.d_model
    sp = sequence_parallel and tp > 1
    split = tp if sp else 1
    etp = tp if etp is None else etp
    attention = attention_activation_bytes(cfg, tp, act)
    attention_norm = norm_bytes(d, act, tp, sp, output_gathered=True)
    hidden_tensors = 4 if cfg.mlp == "swiglu" else 2
    if not cfg.is_moe:
        return 2 * attention_norm + attention + act * hidden_tensors * cfg.ffn_hidden / tp
    E, k = cfg.n_experts, cfg.top_k
    routed = k * min(1.0, cfg.capacity_factor or 1.0)  # routed copies per token
    router = (STAT_BYTES * (2 * E + k + 2) + INDEX_BYTES * k) / split
    dispatch = routed / split * (STAT_BYTES + 2 * INDEX_BYTES)
    run = routed * etp / split if sp else routed  # rows this rank's experts run, per token
    if (sp and etp > 1) or ep > 1:
        dispatch += run * 2 * INDEX_BYTES
    experts = run * act * (d + hidden_tensors * cfg.ffn_hidden / etp) + routed / split * act * 2 * d
    ffn_norm = norm_bytes(d, act, tp, sp, output_gathered=False)
    return attention_norm + ffn_norm + attention + router + dispatch + experts


def stage_extra_activation_bytes(cfg: ModelConfig, tp: int, act: int, first: bool, last: bool,
                                 sequence_parallel: bool = False) -> float:
    """Per token, outside the blocks: token ids on the first stage (at tp > 1 this rank's
    vocabulary indices and the mask of tokens outside them); the final norm (whose output the
    head saves: gathered under sequence parallelism) and the loss's float32 probabilities and
    target ids on the last: V of them per token, or at tp > 1 this rank's ceil(V / tp)
    (vocabulary-parallel head and loss); the received input on later stages when it is not
    float32 (a float32 input is the first norm's saved input already)."""
    sp = sequence_parallel and tp > 1
    extra = 0.0
    if first:
        extra += INDEX_BYTES + (MASK_BYTES if tp > 1 else 0)
    elif act != 4:
        extra += act * cfg.d_model / (tp if sp else 1)
    if last:
        extra += norm_bytes(cfg.d_model, act, tp, sp, output_gathered=True)
        extra += STAT_BYTES * -(-cfg.vocab_size // tp) + INDEX_BYTES
    return extra


def block_activation_bytes(layer: float, block_input: float, attention: float, layer_ids, checkpointing: bool,
                           recompute: str = "block", every: int = 1) -> tuple:
    """(kept, rebuilt): bytes per token a stage's blocks `layer_ids` keep for backward, and what
    backward rebuilds for one block at a time (moray/parallel/recompute.py's choice of blocks:
    global index a multiple of `every`). "block" keeps a checkpointed block's input only;
    "attention" keeps everything but what attention saved. `layer` is one block's bytes,
    `attention` its attention's share (attention_activation_bytes)."""
    ids = list(layer_ids)
    if not checkpointing:
        return len(ids) * layer, 0.0
    n = sum(1 for i in ids if i % every == 0)
    if recompute == "attention":
        return len(ids) * layer - n * attention, attention if n else 0.0
    return n * block_input + (len(ids) - n) * layer, layer if n else 0.0


def microbatches_in_flight(schedule: str, pp: int, stage: int, microbatches: int, virtual_stages: int = 2) -> float:
    """Microbatches whose activations a stage holds at its peak."""
    if schedule == "gpipe":
        return microbatches
    held = min(pp - stage, microbatches)
    if schedule == "interleaved_1f1b" and pp > 1:
        # Narayanan et al. 2021: the interleaved warm-up holds (1 + (p-1)/(p v)) x as much.
        return min(microbatches, held * (1 + (pp - 1) / (pp * virtual_stages)))
    return held
