"""What a training layout is asked to carry: the model, the device, the batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from moray.model.config import ModelConfig
from moray.platform.planner.catalogue import Accelerator

# Share of HBM the planner lets tensors fill: the rest is the CUDA context,
# NCCL buffers, the allocator's fragmentation and kernels' workspaces.
DEFAULT_USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class Workload:
    model: ModelConfig
    accelerator: Accelerator
    gpus_per_node: int
    seq_len: int
    micro_batch_size: int  # the largest the search tries; it also tries halves down to 1
    batch_tokens: Optional[int]  # global tokens per step; None = `microbatches` rounds of micro-batches
    microbatches: Optional[int] = None  # per step and dp rank; None = from batch_tokens (or 2 x pp)
    dtype: str = "bfloat16"
    zero: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 2
    usable_fraction: float = DEFAULT_USABLE_FRACTION
    activation_checkpointing: bool = False  # the configured layout's setting (the search tries both)
    sequence_parallel: bool = False  # the configured layout's setting (the search tries both at tp > 1)
    allow_sequence_parallel: bool = True  # let the search split token-wise tensors over tensor ranks
    etp: Optional[int] = None  # the configured expert tensor parallelism (None = tp; the search tries tp and 1)
    recompute: str = "block"  # what checkpointing recomputes: "block" or "attention" (parallel.recompute)
    recompute_every: int = 1  # checkpoint blocks whose index is a multiple of this (parallel.recompute_every)
    overlap_grad_reduce: bool = True  # gradient buckets reduce during the last backward (parallel.*)
    grad_bucket_bytes: float = 25 * 2 ** 20

    @property
    def usable_bytes(self) -> float:
        return self.accelerator.memory_bytes * self.usable_fraction

    def microbatches_for(self, pp: int, dp: int, micro_batch_size: int) -> int:
        """Microbatches per step and dp rank: parallel.microbatches when set, else enough
        rounds to carry the global batch, else parallel's default 2 x pp."""
        if self.microbatches is not None:
            return self.microbatches
        if self.batch_tokens is None:
            return max(1, 2 * pp)
        per_round = dp * micro_batch_size * self.seq_len
        return max(1, -(-self.batch_tokens // per_round))
