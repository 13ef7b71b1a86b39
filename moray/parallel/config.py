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
    ep: int = 1  # expert parallel: each rank holds n_experts / ep experts; ep x etp divides dp x tp (dims.py)
    # expert tensor parallel: ranks that split each expert's FFN columns; None = tp (then ep divides dp and
    # an expert group sits at stride tp); 1 = experts whole, an expert group is ep consecutive ranks across
    # tp x dp (inside a node when ep <= GPUs per node); must divide tp; < tp needs sequence_parallel
    etp: Optional[int] = None
    dp: Optional[int] = None  # data parallel; None = world_size / (tp * pp)
    microbatches: Optional[int] = None  # per step and dp rank; None = max(1, 2 * pp)
    schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = "1f1b"
    virtual_stages: int = 2  # stages per rank, only for interleaved_1f1b
    zero: Literal[0, 1] = 1  # 1 = ZeRO-1: AdamW state sharded over dp (experts: over the edp copies), gradients
    # reduce-scattered, updated weights all-gathered; 0 = all-reduce, every rank keeps all state
    activation_checkpointing: bool = False  # recompute in backward what `recompute` names
    # what a checkpointed block recomputes: "block" (all of it, keeping only its input) or "attention" (only
    # the attention: the MoE keeps its activations, whose recomputation would repeat the expert all-to-alls)
    recompute: Literal["block", "attention"] = "block"
    recompute_every: int = 1  # checkpoint the blocks whose global index is a multiple of this (1: every block)
    # gradient reduction: buckets of about this many MiB, each launched (async) as soon as its gradients
    # are final in the last microbatch's backward, overlapping the rest of the backward (DDP's scheme)
    grad_bucket_mb: float = 25.0
    overlap_grad_reduce: bool = True  # false: launch every bucket after the backward (for comparison)
    # Megatron's sequence parallelism: between the tensor-parallel regions each tensor rank keeps 1/tp
    # of the sequence (norms, residual stream, router); needs seq_len a multiple of tp; no effect at tp 1
    sequence_parallel: bool = False

    __pydantic_config__ = {"extra": "forbid"}

    def __post_init__(self):
        # Values no layout check would catch before a worker trips on them.
        if self.etp is not None and self.etp < 1:
            raise ValueError(f"parallel.etp {self.etp}: use a divisor of tp (1 .. {self.tp}) or leave it unset (= tp)")
        if self.recompute_every < 1:
            raise ValueError(f"parallel.recompute_every {self.recompute_every}: use 1 (every block) or more")
        if not self.grad_bucket_mb > 0:
            raise ValueError(f"parallel.grad_bucket_mb {self.grad_bucket_mb}: use a positive size (DDP's is 25)")

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
