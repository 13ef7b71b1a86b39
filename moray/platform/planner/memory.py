"""Per-GPU memory of one training rank: weights, gradients, optimizer state, activations.

Bytes per parameter (`dtype`), as moray.parallel's TrainEngine holds them
(tests/test_bf16.py compares its memory_report with this):
  float32   4 weights + 4 grads + 8 Adam (m, v) = 16; no master copy (CPU runs).
  bfloat16  2 bf16 weights + 2 bf16 grads + 12 optimizer (fp32 master, m, v) = 16:
            the ZeRO paper's count (Rajbhandari et al. 2020: "2 + 2 + K, K = 12").
            Megatron's distributed optimizer keeps fp32 main grads (18); the engine
            makes an fp32 copy of a gradient only inside the optimizer step, for its
            own shard, when the activations are already freed.
AdamW's step counter (4 bytes per tensor, not per element) is left out.
ZeRO-1 shards the optimizer part (master + Adam) over the copies of each
parameter: dense parameters over dp, those whole on every tensor rank with
partial gradients (MQA's shared K/V; norms and router under sequence
parallelism) over dp x tp, experts over the edp ranks holding the same experts
(dp x tp / (ep x etp), moray/parallel/dims.py).

A rank holds what moray.parallel gives it (stage s of pp, one of tp tensor
ranks, one of ep expert ranks):
- its stage's layers, split as `moray.parallel.pipeline.partition_layers`
  splits them (contiguous, balanced by cost, the embedding and head costed on
  the first and last stage); stage 0 holds the token embedding, the last stage
  the final norm and the output head (a tied head is a copy there when pp > 1);
  with interleaved 1F1B, rank r holds stages r, r + pp, ...;
- 1/tp of q, o and of every expert's (or the dense MLP's) columns; the norms
  and the router whole; K and V split like q when tp divides n_kv_heads, else
  whole on every tensor rank (MQA's single head); at tp > 1 the embedding and
  the head split over the vocabulary (vocab_parallel.py: ceil(V / tp) rows on
  the fullest rank; serving keeps them whole, rank_params(vocab_parallel=False));
- n_experts / ep experts.

Activations: see activations.py. The rank's peak (total_bytes) is the larger
of the backward's (state, saved activations, the rotary tables, the backward's
workspace) and the optimizer step's (state, the reduced gradient pieces,
AdamW's workspace): transients.py. tests/test_memory_agreement.py measures every
live tensor of each rank of a real gpt4-mini step (tp 2 x pp 2 x ep 2, SP,
checkpointing, ZeRO-1, bf16) against it: within 3%.
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

from moray.model.config import ModelConfig
from moray.model.params import expert_params
from moray.parallel.config import ParallelConfig
from moray.platform.planner.activations import (attention_activation_bytes, block_activation_bytes,
                                                layer_activation_bytes, microbatches_in_flight,
                                                stage_extra_activation_bytes)
from moray.platform.planner.errors import PlanError
from moray.platform.planner.transients import (backward_workspace_bytes, largest_block_weight, optimizer_step_bytes,
                                               rope_bytes)


@dataclass(frozen=True)
class Precision:
    weight: int  # bytes per parameter: the copy forward reads
    grad: int
    master: int  # fp32 master copy, owned by the optimizer (sharded by ZeRO-1)
    adam: int  # Adam m and v (sharded by ZeRO-1)
    activation: int  # bytes per activation element


PRECISIONS = {
    "float32": Precision(weight=4, grad=4, master=0, adam=8, activation=4),
    "bfloat16": Precision(weight=2, grad=2, master=4, adam=8, activation=2),
}


def precision(dtype: str) -> Precision:
    if dtype not in PRECISIONS:
        raise PlanError(f"unknown dtype {dtype!r}; the planner knows {', '.join(PRECISIONS)}")
    return PRECISIONS[dtype]


@dataclass(frozen=True)
class MemoryEstimate:
    """One rank's peak tensor memory, in bytes."""

    stage: int
    layers: int  # transformer blocks on this stage
    params: int  # parameters held by this rank
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float  # includes recompute_bytes
    microbatches_in_flight: float
    recompute_bytes: float = 0.0  # checkpointing: the one block rebuilt in backward (a CPU saved-tensor
    # hook does not see it: it lives inside torch.utils.checkpoint)
    # The peaks between (transients.py): the rotary tables, the backward's workspace on top of the
    # activations, and the optimizer step's gradients (ZeRO pieces) and AdamW workspace.
    buffers_bytes: float = 0.0
    workspace_bytes: float = 0.0
    step_grads_bytes: Optional[float] = None  # None: grads_bytes
    step_workspace_bytes: float = 0.0

    @property
    def backward_bytes(self) -> float:
        """The peak in the backward: state, what the microbatches in flight saved, the workspace."""
        return (self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.buffers_bytes
                + self.activations_bytes + self.workspace_bytes)

    @property
    def step_bytes(self) -> float:
        """The peak in the optimizer step: state, reduced gradients, AdamW's workspace."""
        grads = self.grads_bytes if self.step_grads_bytes is None else self.step_grads_bytes
        return self.weights_bytes + grads + self.optimizer_bytes + self.buffers_bytes + self.step_workspace_bytes

    @property
    def total_bytes(self) -> float:
        """The rank's peak tensor memory: the larger of the two."""
        return max(self.backward_bytes, self.step_bytes)

    @property
    def held_bytes(self) -> float:
        """Weights, gradients, optimizer state and saved activations, no transients: what a count of
        saved tensors sees (TrainEngine.memory_report on the CPU)."""
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes, "backward_bytes": self.backward_bytes,
                "step_bytes": self.step_bytes}


@dataclass(frozen=True)
class RankParams:
    dense: int  # replicated over dp: attention, norms, router, embeddings, a dense MLP
    expert: int  # replicated over the edp ranks holding the same expert shard only
    # the part of `dense` whole on every tensor rank with partial-sum gradients (MQA's shared K/V;
    # under sequence parallelism the norms and the router): ZeRO-1 shards it over dp x tp
    partial: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.expert


def stage_layer_counts(cfg: ModelConfig, num_stages: int, seq_len: Optional[int] = None, tp: int = 1,
                       sequence_parallel: bool = False) -> List[int]:
    """Blocks per pipeline stage, as `moray.parallel.pipeline.partition_layers` splits them (costed
    on one of tp tensor ranks, the head and embedding at their vocabulary share).

    Its objective (least sum of squared stage costs, blocks alike, the
    embedding and head costed on the end stages) is separable and convex, so
    giving blocks one at a time to the cheapest stage (earlier stages on ties)
    reaches the same optimum in O(n log p) instead of its O(p n^2).
    """
    from moray.parallel.pipeline import head_cost, layer_cost

    if not 1 <= num_stages <= cfg.n_layers:
        raise PlanError(f"pp={num_stages} stages for {cfg.n_layers} layers: each stage needs a layer; "
                        f"use pp <= {cfg.n_layers}")
    block = layer_cost(cfg, seq_len or cfg.max_seq_len, tp, sequence_parallel)
    return list(_balanced(cfg.n_layers, num_stages, block, head_cost(cfg, tp)))


@functools.lru_cache(maxsize=4096)
def _balanced(n: int, num_stages: int, block: float, edge: float) -> Tuple[int, ...]:
    counts = [1] * num_stages
    heap = [(block + edge * ((s == 0) + (s == num_stages - 1)), s) for s in range(num_stages)]
    heapq.heapify(heap)
    for _ in range(n - num_stages):
        cost, s = heapq.heappop(heap)
        counts[s] += 1
        heapq.heappush(heap, (cost + block, s))
    return tuple(counts)


@dataclass(frozen=True)
class PipelineRank:
    layers: int  # blocks held (summed over its virtual stages)
    first: bool  # holds the token embedding
    last: bool  # holds the final norm and the output head


def pipeline_ranks(cfg: ModelConfig, pp: int, seq_len: Optional[int] = None, virtual_stages: int = 1,
                   layer_counts: Optional[Sequence[int]] = None, tp: int = 1,
                   sequence_parallel: bool = False) -> List[PipelineRank]:
    """What each of the pp pipeline ranks holds; interleaved: rank r has stages r, r + pp, ...
    seq_len None costs attention at model.max_seq_len, as the trainer's split does; tp and
    sequence_parallel as the trainer runs (serving: tp 1, its head is whole)."""
    n_stages = pp * virtual_stages
    counts = (list(layer_counts) if layer_counts is not None
              else stage_layer_counts(cfg, n_stages, seq_len, tp, sequence_parallel))
    if len(counts) != n_stages or sum(counts) != cfg.n_layers or min(counts) < 1:
        raise PlanError(f"layer_counts {counts} must give {n_stages} stages of >= 1 layer summing to {cfg.n_layers}")
    return list(_ranks(tuple(counts), pp, virtual_stages))


@functools.lru_cache(maxsize=4096)
def _ranks(counts: Tuple[int, ...], pp: int, virtual_stages: int) -> Tuple[PipelineRank, ...]:
    return tuple(PipelineRank(sum(counts[r + v * pp] for v in range(virtual_stages)), r == 0, r == pp - 1)
                 for r in range(pp))


def rank_params(cfg: ModelConfig, tp: int, ep: int, rank: PipelineRank, pp: int,
                vocab_parallel: bool = False, etp: Optional[int] = None,
                sequence_parallel: bool = False) -> RankParams:
    """What one rank holds. vocab_parallel: the embedding and the head split over tp (training at
    tp > 1); the fullest rank's ceil(V / tp) rows. etp: the ranks splitting each expert's
    columns (None = tp); sequence_parallel: the norms and router see 1/tp of the tokens."""
    etp = tp if etp is None else etp
    d = cfg.d_model
    qo = 2 * d * cfg.n_heads * cfg.head_dim // tp
    kv = 2 * d * cfg.n_kv_heads * cfg.head_dim
    kv_replicated = cfg.n_kv_heads % tp != 0
    kv = kv if kv_replicated else kv // tp  # fewer KV heads than ranks: whole on each
    router = d * cfg.n_experts if cfg.is_moe else 0
    sp = sequence_parallel and tp > 1
    partial = rank.layers * ((kv if kv_replicated else 0) + ((2 * d + router) if sp else 0))
    if rank.last and sp:
        partial += d  # the final norm
    dense = rank.layers * (qo + kv + 2 * d + router)
    if cfg.is_moe:
        ffn = expert_params(cfg) // etp
        expert = rank.layers * (cfg.n_experts // ep) * ffn
    else:
        ffn = expert_params(cfg) // tp
        expert = 0
    if not cfg.is_moe:
        dense += rank.layers * ffn
    table = (-(-cfg.vocab_size // tp) if vocab_parallel else cfg.vocab_size) * d
    if rank.first:
        dense += table
    if rank.last:
        dense += d  # final norm
        if not cfg.tie_embeddings or pp > 1:
            dense += table  # output head (a tied head is a copy on the last stage)
    return RankParams(dense=dense, expert=expert, partial=partial)


def estimate_memory(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    micro_batch_size: int,
    seq_len: int,
    dtype: str = "bfloat16",
    zero: Optional[int] = None,
    activation_checkpointing: Optional[bool] = None,
    *,
    sequence_parallel: Optional[bool] = None,
    stage: Optional[int] = None,
    dp: Optional[int] = None,
    microbatches: Optional[int] = None,
    layer_counts: Optional[Sequence[int]] = None,
    fused_adamw: bool = True,
) -> MemoryEstimate:
    """Peak tensor memory of one rank of `parallel_cfg`; `stage=None` gives the stage with the most.

    zero / activation_checkpointing / microbatches default to parallel_cfg's;
    dp defaults to parallel_cfg.dp and is required when ZeRO-1 shards over it;
    sequence_parallel: token-wise tensors split over the tensor ranks (Megatron's SP); None = parallel_cfg's;
    layer_counts overrides the split (blocks per stage; pp x virtual_stages of them).
    """
    per_stage = estimate_memory_per_stage(
        model_cfg, parallel_cfg, micro_batch_size, seq_len, dtype, zero, activation_checkpointing,
        sequence_parallel=sequence_parallel, dp=dp, microbatches=microbatches, layer_counts=layer_counts,
        stages=None if stage is None else [stage], fused_adamw=fused_adamw,
    )
    return max(per_stage, key=lambda m: m.total_bytes)


def estimate_memory_per_stage(
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    micro_batch_size: int,
    seq_len: int,
    dtype: str = "bfloat16",
    zero: Optional[int] = None,
    activation_checkpointing: Optional[bool] = None,
    *,
    sequence_parallel: Optional[bool] = None,
    dp: Optional[int] = None,
    microbatches: Optional[int] = None,
    layer_counts: Optional[Sequence[int]] = None,
    stages: Optional[Sequence[int]] = None,
    fused_adamw: bool = True,
) -> List[MemoryEstimate]:
    """One estimate per pipeline rank (see estimate_memory). fused_adamw: the optimizer step's
    kernel makes no temporaries (CUDA); False: the CPU's per-tensor AdamW (transients.py)."""
    cfg, par = model_cfg, parallel_cfg
    prec = precision(dtype)
    zero = par.zero if zero is None else zero
    ac = par.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    m = par.num_microbatches if microbatches is None else microbatches
    v = par.virtual_stages if par.schedule == "interleaved_1f1b" and par.pp > 1 else 1
    if sequence_parallel is None:
        sequence_parallel = par.sequence_parallel
    sp = sequence_parallel and par.tp > 1
    ranks = pipeline_ranks(cfg, par.pp, virtual_stages=v, layer_counts=layer_counts, tp=par.tp,
                           sequence_parallel=sp)
    if cfg.n_experts % par.ep:
        raise PlanError(f"ep={par.ep} does not divide n_experts={cfg.n_experts}")
    dp = dp if dp is not None else par.dp
    if zero and dp is None:
        raise PlanError("ZeRO-1 shards over the data-parallel group: pass dp= or set parallel.dp "
                        "(ParallelConfig.resolved_dp(world_size))")
    dp = dp or 1
    etp = par.etp or par.tp  # expert tensor parallelism (moray/parallel/dims.py)
    if (dp * par.tp) % (par.ep * etp) or par.tp % etp or (etp == par.tp and dp % par.ep):
        raise PlanError(f"ep={par.ep} x etp={etp} must divide dp={dp} x tp={par.tp} (with etp = tp: ep must "
                        "divide dp); see moray/parallel/dims.py")
    edp = dp * par.tp // (par.ep * etp)
    tokens = micro_batch_size * seq_len
    layer = layer_activation_bytes(cfg, par.tp, prec.activation, sp, par.ep, etp)
    block_input = prec.activation * cfg.d_model / (par.tp if sp else 1)
    attention = attention_activation_bytes(cfg, par.tp, prec.activation)
    counts = (list(layer_counts) if layer_counts is not None
              else stage_layer_counts(cfg, par.pp * v, None, par.tp, sp))
    starts = [sum(counts[:i]) for i in range(len(counts))]
    out = []
    for s in range(par.pp) if stages is None else stages:
        rank = ranks[s]
        params = rank_params(cfg, par.tp, par.ep, rank, par.pp, vocab_parallel=par.tp > 1, etp=etp,
                             sequence_parallel=sp)
        # ZeRO-1 (moray/parallel/zero.py): dense over dp, partial-gradient ones over dp x tp, experts over edp
        sharded = ((params.dense - params.partial) / dp + params.partial / (dp * par.tp) + params.expert / edp
                   if zero else params.total)
        flight = microbatches_in_flight(par.schedule, par.pp, s, m, par.virtual_stages)
        extra = stage_extra_activation_bytes(cfg, par.tp, prec.activation, rank.first, rank.last, sp)
        ids = [i for st in range(s, par.pp * v, par.pp) for i in range(starts[st], starts[st] + counts[st])]
        kept, rebuilt = block_activation_bytes(layer, block_input, attention, ids, ac, par.recompute,
                                               par.recompute_every)
        recompute = tokens * rebuilt
        activations = flight * tokens * (kept + extra) + recompute
        workspace = backward_workspace_bytes(cfg, par.tp, par.ep, etp, prec.activation, prec.grad, tokens,
                                             rank.first, rank.last, recompute)
        # The optimizer step: the reduced gradients (ZeRO-1: the reduce-scatter leaves this rank its
        # pieces only) and AdamW's workspace over the pieces it updates.
        shards = ((dp if zero else 1), (dp * par.tp if zero else 1), (edp if zero else 1))
        step_grads = ((params.dense - params.partial) / shards[0] + params.partial / shards[1]
                      + params.expert / shards[2])
        rows = -(-cfg.vocab_size // par.tp) if par.tp > 1 else cfg.vocab_size
        dense_largest = max(rows * cfg.d_model if (rank.first or rank.last) else 0,
                            cfg.d_model * cfg.n_heads * cfg.head_dim / par.tp)
        expert_largest = largest_block_weight(cfg, par.tp, par.ep, etp) if cfg.is_moe else 0
        largest_owned = max(dense_largest / shards[0], expert_largest / shards[2])
        out.append(MemoryEstimate(
            stage=s, layers=rank.layers, params=params.total,
            weights_bytes=params.total * prec.weight,
            grads_bytes=params.total * prec.grad,
            optimizer_bytes=sharded * (prec.master + prec.adam),
            activations_bytes=activations,
            microbatches_in_flight=flight,
            recompute_bytes=recompute,
            buffers_bytes=rope_bytes(cfg, prec.activation),
            workspace_bytes=workspace,
            step_grads_bytes=step_grads * prec.grad,
            step_workspace_bytes=optimizer_step_bytes(sharded, largest_owned, prec.master > 0, fused_adamw),
        ))
    return out
