"""What a rank holds beyond its state and its saved activations: the peaks in between.

A training step peaks in one of two places (tests/test_memory_agreement.py
measures both, every live tensor of every rank, on the CPU):

- in the backward: the weights, the gradients, the optimizer state, the rotary
  tables, what the microbatches in flight saved (activations.py), and the
  workspace of the backward running. Its largest moment is one of
  * a block's backward: the block checkpointing rebuilt, plus one weight's
    gradient computed before it is added into .grad (the block's largest
    weight: the stacked experts' w1, E/ep x D x F/etp), the bytes per token
    the backward allocates beyond what it frees being small (~2% of a block);
  * the head's, on the last stage, before any block: the logits' gradient in
    the compute dtype (the loss's backward works in its saved float32
    probabilities, in place, then casts: N x V/tp more; with whole-vocabulary
    logits at tp 1, F.cross_entropy's float32 gradient and its cast,
    N x V x (4 + a)) and the head's weight gradient (V/tp x D);
  * the embedding's, on the first stage: its weight gradient (V/tp x D).
- in the optimizer step, the activations freed: the weights, the state, the
  rotary tables, the gradients as the reduction left them (under ZeRO-1 only
  this rank's pieces of the sharded ones: moray/parallel/grad_reduce.py frees
  the local gradient once it is in the reduce-scatter's buffer), and AdamW's
  workspace (moray/parallel/mixed_precision.adamw_update): float32 copies of
  the bf16 gradient pieces, all at once; the fused CUDA kernel makes nothing
  else, while the CPU's per-tensor AdamW (foreach is CUDA's) makes three
  temporaries the size of one piece (sqrt(v), its scaling, the update).
"""

from __future__ import annotations

from moray.model.config import ModelConfig

FP32 = 4


def rope_bytes(cfg: ModelConfig, act: int) -> float:
    """The rotary tables every stage keeps (cos and sin, max_seq_len x head_dim, in the compute dtype)."""
    return 2 * cfg.max_seq_len * cfg.head_dim * act


def largest_block_weight(cfg: ModelConfig, tp: int, ep: int, etp: int) -> float:
    """Elements of a block's largest weight on one rank: its gradient is one temporary in backward."""
    d = cfg.d_model
    qo = d * cfg.n_heads * cfg.head_dim / tp
    kv = d * cfg.n_kv_heads * cfg.head_dim
    kv = kv if cfg.n_kv_heads % tp else kv / tp
    if cfg.is_moe:
        ffn = cfg.n_experts / ep * d * cfg.ffn_hidden / etp  # one stacked expert weight (w1, w2 or w3)
    else:
        ffn = d * cfg.ffn_hidden / tp
    return max(qo, kv, ffn)


def backward_workspace_bytes(cfg: ModelConfig, tp: int, ep: int, etp: int, act: int, grad: int, tokens: int,
                             first: bool, last: bool, recompute: float) -> float:
    """The backward's largest moment beyond what the microbatches in flight saved (see the module
    doc). `recompute` is the rebuilt block's bytes (0 without checkpointing), which the caller
    already counts: the result is what comes on top of it."""
    rows = -(-cfg.vocab_size // tp)  # the fullest tensor rank's vocabulary rows
    block = recompute + grad * largest_block_weight(cfg, tp, ep, etp)
    head = embedding = 0.0
    if last:
        logits_grad = tokens * rows * (act if tp > 1 else FP32 + act)
        if tp > 1 and act == FP32:
            logits_grad = 0.0  # the loss hands back its float32 probabilities, changed in place
        head = logits_grad + grad * rows * cfg.d_model
    if first:
        embedding = grad * rows * cfg.d_model
    return max(block, head, embedding) - recompute


def optimizer_step_bytes(owned: float, largest_owned: float, master: bool, fused: bool) -> float:
    """AdamW's workspace over this rank's `owned` elements (its ZeRO pieces), `largest_owned` the
    largest piece: float32 copies of bf16 gradients (master weights) and, unfused, three temporaries
    of one piece."""
    copies = FP32 * owned if master else 0.0
    return copies + (0.0 if fused else 3 * FP32 * largest_owned)
