"""Learning-rate and batch-size schedules: pure functions of the step, so a
resumed run recomputes them exactly from the checkpointed step and token count."""

from __future__ import annotations

import math
from typing import Optional


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `decay_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def batch_sequences_at(tokens_seen: int, *, seq_len: int, unit: int, batch_tokens: Optional[int],
                       batch_tokens_start: Optional[int], batch_ramp_tokens: int) -> int:
    """Global sequences in the next step, a multiple of `unit` (dp * micro_batch_size).

    GPT-4's batch was ramped up over days to 60M tokens; here it grows linearly
    with tokens seen from `batch_tokens_start` to `batch_tokens`, rounded down
    to whole rounds of microbatches (never below one round).
    """
    full = batch_tokens if batch_tokens is not None else unit * seq_len
    start = batch_tokens_start if batch_tokens_start is not None else full
    if batch_ramp_tokens > 0 and tokens_seen < batch_ramp_tokens:
        target = start + (full - start) * tokens_seen / batch_ramp_tokens
    else:
        target = full
    seqs = int(target // seq_len)
    return max(unit, seqs - seqs % unit)
