"""Pipeline parallelism: contiguous layer ranges per stage, run by torch.distributed.pipelining.

A stage is the model itself with the other stages' parts removed (layers is a
ModuleDict keyed by global index, so names stay the whole model's): the first
stage keeps the embedding and takes token ids, the last keeps the final norm and
the head and returns logits, the others take and return hidden states.

Stages are balanced by cost (least sum of squared stage costs) in forward FLOPs
per token on one tensor rank: a block costs its share of the projections, of the
attention scores (at max_seq_len) and of the top_k experts it runs, plus what tp
does not split (MQA's K/V head, which every rank computes; the router, unless
sequence parallelism splits its tokens); the head costs its share of the D x V
product (vocabulary-parallel: ceil(V / tp) rows), and the embedding is counted
like the head (its gradient and optimizer update are as large). With the head
whole on every tensor rank the last stage would be tp times heavier than this
split assumes; vocab_parallel.py is why it is not.
Schedules: 1F1B (default), GPipe, and interleaved 1F1B with `virtual_stages`
stages per rank (rank r holds stages r, r + pp, r + 2 pp, ...). Gradients are
not rescaled by the schedule: the loss is already divided by the microbatches.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from moray.model.config import ModelConfig
from moray.parallel.config import ParallelConfig


# ---------------------------------------------------------------- balancing


def layer_cost(cfg: ModelConfig, seq_len: int, tp: int = 1, sequence_parallel: bool = False) -> float:
    """Forward FLOPs per token of one block on one of tp tensor ranks."""
    d, hd = cfg.d_model, cfg.head_dim
    heads = cfg.n_heads / tp
    kv = cfg.n_kv_heads / tp if cfg.n_kv_heads % tp == 0 else 1  # fewer KV heads than ranks: one each
    proj = 2 * d * (heads + 2 * kv) * hd + 2 * heads * hd * d
    scores = 2 * heads * hd * seq_len  # QK^T and AV over a causal half of seq_len
    ffn = (3 if cfg.mlp == "swiglu" else 2) * 2 * d * cfg.ffn_hidden * cfg.active_experts / tp
    router = 2 * d * cfg.n_experts / (tp if sequence_parallel else 1) if cfg.is_moe else 0
    return float(proj + scores + ffn + router)


def head_cost(cfg: ModelConfig, tp: int = 1) -> float:
    """The head's (or the embedding's) D x V on the tensor rank with the most vocabulary rows."""
    return float(2 * cfg.d_model * -(-cfg.vocab_size // tp))


def partition_layers(cfg: ModelConfig, num_stages: int, seq_len: int | None = None, tp: int = 1,
                     sequence_parallel: bool = False) -> List[range]:
    """Contiguous layer ranges, one per stage, as even in cost as possible (least sum of squared
    stage costs; stage 0 also pays for the embedding, the last stage for the head), costed on one
    of tp tensor ranks: tp 1 for a head whole on every rank (serving), the training tp otherwise."""
    n = cfg.n_layers
    if not 1 <= num_stages <= n:
        raise ValueError(f"{num_stages} pipeline stages for {n} layers: every stage needs a layer; "
                         f"use 1..{n} stages")
    c = layer_cost(cfg, seq_len or cfg.max_seq_len, tp, sequence_parallel)
    edge = head_cost(cfg, tp)

    def cost(s: int, i: int, j: int) -> float:  # stage s holding layers [i, j)
        return (j - i) * c + (edge if s == 0 else 0.0) + (edge if s == num_stages - 1 else 0.0)

    # best[s][j]: least sum of squared costs of stages 0..s holding layers [0, j)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, 0, j) ** 2
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            for i in range(s, j):
                v = best[s - 1][i] + cost(s, i, j) ** 2
                if v <= best[s][j] * (1 + 1e-12):  # ties: the latest cut, earlier stages take more
                    best[s][j], cut[s][j] = v, i
    bounds, j = [n], n
    for s in range(num_stages - 1, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


def stage_ids(pp_rank: int, pp: int, virtual_stages: int) -> List[int]:
    """The stages one rank holds: one, or (interleaved) one per round, loop style."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


def virtual_stages_of(cfg: ParallelConfig) -> int:
    return cfg.virtual_stages if cfg.schedule == "interleaved_1f1b" else 1


def bubble_fraction(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """Idle share of a step in theory: (p - 1) / (v m + p - 1) (v = 1: 1F1B and GPipe)."""
    if pp == 1:
        return 0.0
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


# ---------------------------------------------------------------- stages


def keep_stage(model, layers: Sequence[int], first: bool, last: bool):
    """Cut `model` (a Transformer, typically on the meta device) down to one stage, in place."""
    for name in list(model.layers.keys()):
        if int(name) not in layers:
            del model.layers[name]
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model


def build_schedule(stages: list, cfg: ParallelConfig, loss_fn: Callable):
    """The torch.distributed.pipelining schedule over this rank's PipelineStage(s).

    Gradients are not rescaled by the schedule (scale_grads=False): loss_fn already divides
    by the number of microbatches, and the router losses use the same scale."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    m = cfg.num_microbatches
    if cfg.schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, m, loss_fn=loss_fn, scale_grads=False)
    cls = Schedule1F1B if cfg.schedule == "1f1b" else ScheduleGPipe
    return cls(stages[0], m, loss_fn=loss_fn, scale_grads=False)


# ---------------------------------------------------------------- running


def _timed_stage_class():
    """PipelineStage that adds the time of each forward and backward chunk to `clock[0]`: the
    rank's busy time, so 1 - busy / step time is its measured bubble. Before its last backward of
    a step (the m-th: `backwards` counts them, the runner resets it) it calls
    before_last_backward(stage_index): from then on the stage's gradients are final, and their
    reduction may start as they come (grad_reduce.py). Counted here rather than read from the
    schedule's last_backward flag, so every schedule, in any microbatch order, and torch 2.11's
    are covered alike."""
    from torch.distributed.pipelining import PipelineStage

    class TimedStage(PipelineStage):
        clock: List[float]
        microbatches: int
        backwards: int
        before_last_backward: Optional[Callable[[int], None]]

        def forward_one_chunk(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return super().forward_one_chunk(*args, **kwargs)
            finally:
                self.clock[0] += time.perf_counter() - t

        def backward_one_chunk(self, *args, **kwargs):
            self.backwards += 1
            if self.backwards == self.microbatches and self.before_last_backward is not None:
                self.before_last_backward(self.stage_index)
            t = time.perf_counter()
            try:
                return super().backward_one_chunk(*args, **kwargs)
            finally:
                self.clock[0] += time.perf_counter() - t

    return TimedStage


class PipelineRunner:
    """This rank's stages (model parts with a `stage_index`) under the configured schedule.

    Stages are built with example inputs and outputs (static shapes: torch's metadata inference
    would otherwise run the model once on uninitialised tensors), for one microbatch shape, and
    rebuilt when it changes (a batch-size ramp). Activations between stages (and their gradients)
    and the logits are in `dtype`, the model's: bf16 runs send bf16."""

    def __init__(self, parts: Sequence, cfg: ModelConfig, parallel_cfg: ParallelConfig, pp: int, group,
                 device: torch.device, dtype: torch.dtype, loss_fn: Callable, seq_shards: int = 1,
                 vocab_rows: int | None = None, before_last_backward: Optional[Callable[[int], None]] = None):
        """seq_shards: stages exchange (B, T / seq_shards, D) (sequence parallelism: tp);
        vocab_rows: the width of this rank's logits (vocabulary parallelism), None = vocab_size;
        before_last_backward(stage_index): called before a stage's last microbatch's backward."""
        self.parts, self.cfg, self.parallel_cfg, self.pp, self.group = parts, cfg, parallel_cfg, pp, group
        self.device, self.dtype, self.loss_fn = device, dtype, loss_fn
        self.seq_shards, self.vocab_rows = seq_shards, vocab_rows or cfg.vocab_size
        self.n_stages = pp * len(parts)
        self.has_first = any(part.stage_index == 0 for part in parts)
        self.has_last = any(part.stage_index == self.n_stages - 1 for part in parts)
        self._schedule, self._shape, self._stages = None, None, []
        self._clock = [0.0]
        self.before_last_backward = before_last_backward

    def _build(self, microbatch: int, seq_len: int):
        hidden = dict(dtype=self.dtype, device=self.device, requires_grad=True)
        stage_cls = _timed_stage_class()
        stages = []
        for part in self.parts:
            sid = part.stage_index
            between = (microbatch, seq_len // self.seq_shards, self.cfg.d_model)
            if sid == 0:
                example_in = torch.zeros(microbatch, seq_len, dtype=torch.long, device=self.device)
            else:
                example_in = torch.empty(between, **hidden)
            if sid == self.n_stages - 1:
                example_out = torch.empty(microbatch, seq_len, self.vocab_rows, **hidden)
            else:
                example_out = torch.empty(between, **hidden)
            stage = stage_cls(part, sid, self.n_stages, self.device, input_args=example_in,
                              output_args=example_out, group=self.group)
            stage.clock = self._clock
            stage.microbatches, stage.backwards = self.parallel_cfg.num_microbatches, 0
            stage.before_last_backward = self.before_last_backward
            stages.append(stage)
        self._stages = stages
        return build_schedule(stages, self.parallel_cfg, self.loss_fn)

    def run(self, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[List[torch.Tensor], float]:
        """Forward and backward over all microbatches. Returns the last stage's per-microbatch
        losses (empty elsewhere) and this rank's measured bubble (idle share of the step)."""
        shape = (inputs.shape[0] // self.parallel_cfg.num_microbatches, inputs.shape[1])
        if shape != self._shape:
            self._schedule, self._shape = self._build(*shape), shape
        losses: List[torch.Tensor] = []
        for stage in self._stages:
            stage.backwards = 0
        started, self._clock[0] = time.perf_counter(), 0.0
        # return_outputs=False: the last stage would otherwise keep every microbatch's logits until
        # the step ends (36 x 205 MB on a gpt4 tp8 rank) only to hand them back; the losses suffice.
        no_outputs = {"return_outputs": False} if "return_outputs" in inspect.signature(
            self._schedule.step).parameters else {}
        self._schedule.step(*((inputs,) if self.has_first else ()),
                            target=targets if self.has_last else None,
                            losses=losses if self.has_last else None, **no_outputs)
        bubble = 1.0 - self._clock[0] / max(time.perf_counter() - started, 1e-9)
        return [loss.detach() for loss in losses], bubble
