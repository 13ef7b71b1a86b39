"""The parallel config section: how one model is laid over many devices.

A plain dataclass (no pydantic, no Ray) so `moray.parallel` imports on the GPU
machine. `platform/config.py` validates it and derives `dp` from the cluster.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Optional


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel: shards attention heads, expert FFN columns and the vocabulary; keep within a node
    pp: int = 1  # pipeline stages; layers are split into pp balanced ranges
    ep: int = 1  # expert parallel: each rank holds n_experts / ep experts; carved out of dp (ep divides dp)
    dp: Optional[int] = None  # data parallel; None = world_size / (tp * pp)
    microbatches: Optional[int] = None  # per step and dp rank; None = max(1, 2 * pp)
    schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = "1f1b"
    virtual_stages: int = 2  # stages per rank, only for interleaved_1f1b
    zero: Literal[0, 1] = 1  # 1 = ZeRO-1: AdamW state sharded over dp (experts: over the dp / ep copies)
    activation_checkpointing: bool = False  # recompute each block in backward
    # Megatron's sequence parallelism: between the tensor-parallel regions each tensor rank keeps 1/tp
    # of the sequence (norms, residual stream, router); needs seq_len a multiple of tp; no effect at tp 1
    sequence_parallel: bool = False

    __pydantic_config__ = {"extra": "forbid"}

    def resolved_dp(self, world_size: int) -> int:
        if world_size % (self.tp * self.pp):
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp}; "
                f"use a world size that is a multiple of {self.tp * self.pp}"
            )
        dp = world_size // (self.tp * self.pp)
        if self.dp is not None and self.dp != dp:
            raise ValueError(
                f"parallel.dp={self.dp} but world size {world_size} / (tp {self.tp} * pp {self.pp}) = {dp}; "
                f"omit parallel.dp or set it to {dp}"
            )
        return dp

    @property
    def num_microbatches(self) -> int:
        return self.microbatches if self.microbatches is not None else max(1, 2 * self.pp)

    def to_dict(self) -> dict:
        return asdict(self)
