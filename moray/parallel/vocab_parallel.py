"""Vocabulary parallelism (Megatron-LM): the embedding, the output head and the loss split over tp.

Legend: V = vocab_size, Vr = this rank's rows [start, end), N = tokens, D = d_model.

A 100k vocabulary at d_model 15k is 3 GB per table in bf16, and its logits at
8k tokens are 3 GB more in float32: whole on every tensor rank they cost the
last stage more than its blocks. Split as torch.chunk splits (rank r holds rows
from r * ceil(V / tp), the last ranks may hold fewer, so V need not divide):

- embedding: a rank looks up the tokens in its rows, zeros the others, and the
  partial embeddings are summed over tp (reduce_from_tp), or under sequence
  parallelism reduce-scattered along the sequence (reduce_scatter_seq), which
  is where the sequence-sharded stream begins;
- head: column-parallel over the vocabulary, (N, D) -> (N, Vr) logits; its
  input enters by copy_to_tp (backward sums the input gradient over tp), under
  sequence parallelism by gather_seq;
- loss: cross-entropy from the logit shards (vocab_parallel_cross_entropy): the
  max, the sum of exponentials and the target's logit are all-reduced over tp
  (per token, not per logit), so no rank ever holds (N, V).

Tied embeddings share one (Vr, D) shard between the table and the head, which
is what both need. The model's modules keep their names and types (the table
is still an nn.Embedding called tok_embeddings), so checkpoints, hooks and the
chaos drill's NaN poisoning see no difference; the shards are tagged with
their whole size, so the checkpoint reshards them into any layout.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moray.parallel.collectives import copy_to_tp, gather_seq, reduce_from_tp, reduce_scatter_seq
from moray.parallel.sharding import chunk_start, tag


def vocab_range(vocab_size: int, rank: int, size: int) -> Tuple[int, int]:
    """[start, end) of the vocabulary rows tensor rank `rank` of `size` holds (torch.chunk's split)."""
    return chunk_start(vocab_size, size, rank), chunk_start(vocab_size, size, rank + 1)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, end) of the token table; forward takes whole-vocabulary token ids."""

    def __init__(self, table: nn.Embedding, start: int, end: int, group, sequence_parallel: bool):
        super().__init__(end - start, table.embedding_dim, _weight=table.weight.detach()[start:end].clone())
        self.start, self.group, self.sequence_parallel = start, group, sequence_parallel

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        outside = (local < 0) | (local >= self.num_embeddings)  # (B, T): another rank's rows
        h = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, D)
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_seq(h, self.group) if self.sequence_parallel else reduce_from_tp(h, self.group)


def apply_vocab_parallel(model: nn.Module, group, rank: int, size: int, sequence_parallel: bool = False) -> None:
    """Split the token table and the output head of `model` (a Transformer or a pipeline stage
    that may hold neither) over the tp group. Use vocab_parallel_cross_entropy on its logits."""
    if size == 1:
        return
    V = model.cfg.vocab_size
    start, end = vocab_range(V, rank, size)
    table, head = model.tok_embeddings, model.output
    tied = table is not None and head is not None and head.weight is table.weight
    if table is not None:
        model.tok_embeddings = VocabParallelEmbedding(table, start, end, group, sequence_parallel)
        tag(model.tok_embeddings, "weight", tp_dim=0, tp_full=V)
    if head is not None:
        head.weight = model.tok_embeddings.weight if tied else nn.Parameter(head.weight.detach()[start:end].clone())
        head.out_features = end - start
        tag(head, "weight", tp_dim=0, tp_full=V)
        enter = gather_seq if sequence_parallel else copy_to_tp
        head.register_forward_pre_hook(lambda m, args: (enter(args[0], group),) + tuple(args[1:]))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Megatron's vocab_parallel_cross_entropy: per-token loss from (N, Vr) logit shards."""

    @staticmethod
    def forward(ctx, logits, targets, start, group):
        x = logits.float()  # (N, Vr); float32 whatever the compute dtype, as F.cross_entropy(logits.float())
        top = x.max(-1).values  # (N,)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        x = x - top.unsqueeze(-1)  # a new tensor: the logits stay as they were
        local = targets - start
        inside = (local >= 0) & (local < x.shape[-1])  # (N,): the target's logit is on this rank
        picked = x.gather(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1) * inside  # (N,)
        exp = x.exp_()
        sums = torch.stack([exp.sum(-1), picked])  # (2, N): one all-reduce for both
        dist.all_reduce(sums, group=group)
        softmax = exp.div_(sums[0].unsqueeze(-1))  # (N, Vr): kept for backward, 1/tp of the whole
        ctx.save_for_backward(softmax, torch.where(inside, local, -1))
        ctx.logits_dtype = logits.dtype
        return sums[0].log() - sums[1]

    @staticmethod
    def backward(ctx, grad):
        softmax, target = ctx.saved_tensors  # d loss / d logit = softmax - one_hot(target), on this rank's rows
        inside = target >= 0
        rows = torch.arange(softmax.shape[0], device=softmax.device)
        softmax[rows, target.clamp(min=0)] -= inside.to(softmax.dtype)  # in place: backward runs once
        return softmax.mul_(grad.unsqueeze(-1)).to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, start: int, group) -> torch.Tensor:
    """logits (N, Vr) for vocabulary rows [start, start + Vr), targets (N,) whole-vocabulary ids ->
    per-token cross-entropy (N,) float32, the same on every rank of the group."""
    return _VocabParallelCrossEntropy.apply(logits, targets, start, group)
