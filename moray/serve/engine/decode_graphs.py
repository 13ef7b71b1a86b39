"""Pure-decode steps at bucketed shapes, replayed from CUDA graphs.

    graphs = DecodeGraphs(model, kv_caches, block_size, scratch_block, sizes=[1, 2, 4, 8, 16], mode="cuda")
    if graphs.accepts(chunks):
        logits, expert_tokens = graphs.run(chunks)   # (len(chunks), V), (MoE layers, E) or None

A step whose every chunk is one decode token runs `forward_decode_static` (model/paged_static.py)
at the smallest batch bucket >= its sequences and the smallest power-of-two block-table width
>= its longest context; each (batch, width) shape is captured once, on first use, into a CUDA
graph sharing one memory pool (vLLM captures its sizes the same way), and replayed after
copying the step's inputs into the graph's own input buffers. Mixed steps (prefill chunks,
speculative verification) take the planned path.

mode "static" runs the same bucketed, padded function without capture: the CPU's check of the
path a GPU replays (tests/test_engine_decode_graphs.py), where padding, buckets and the scratch
slot are what can go wrong. mode "cuda" captures and needs a CUDA device, bf16 experts (the
grouped product is the capturable MoE path; other dtypes loop over experts reading counts on
the host) and a dropless MoE (a capacity factor drops tokens by data-dependent indexing).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from moray.model.moe import MoE, count_per_expert
from moray.model.paged import KVPair, SeqChunk
from moray.model.paged_static import forward_decode_static
from moray.model.transformer import Transformer

MODES = ("cuda", "static")


def default_sizes(max_num_seqs: int) -> List[int]:
    """vLLM's capture sizes: 1, 2, 4, then every multiple of 8, up to the engine's sequence cap."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


def why_not_capturable(model: Transformer, device: torch.device) -> Optional[str]:
    """None when a decode step of this model can be captured on this device; else the reason."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device (the engine runs on {device})"
    if model.tok_embeddings is None or model.output is None:
        return "a pipeline stage (no embedding or head) is not captured whole"
    for layer in model.layers.values():
        ff = layer.feed_forward
        if isinstance(ff, MoE):
            if ff.capacity_factor is not None:
                return "an MoE layer with a capacity factor drops tokens by data-dependent indexing"
            if ff.experts.w1.dtype != torch.bfloat16:
                return (f"experts in {ff.experts.w1.dtype}: only bf16 runs the grouped product on CUDA "
                        "(other dtypes loop over experts, reading counts on the host)")
    return None


@dataclass
class _Shape:
    """One captured (or, in static mode, fixed) shape and its input and output buffers."""

    batch: int
    width: int  # block-table entries
    tokens: torch.Tensor  # (B,)
    positions: torch.Tensor  # (B,)
    slots: torch.Tensor  # (B,)
    tables: torch.Tensor  # (B, width) int32
    seq_lens: torch.Tensor  # (B,)
    graph: Optional["torch.cuda.CUDAGraph"] = None
    logits: Optional[torch.Tensor] = None  # (B, V): the graph's output buffer
    expert_ids: Optional[List[torch.Tensor]] = None  # per MoE layer (B, k): buffers the replay rewrites


class DecodeGraphs:
    def __init__(self, model: Transformer, kv_caches: List[KVPair], block_size: int, scratch_block: int,
                 sizes: Sequence[int], mode: str = "cuda", max_blocks: Optional[int] = None):
        if mode not in MODES:
            raise ValueError(f"decode graph mode {mode!r}: use one of {MODES}")
        device = model.rope_cos.device
        if mode == "cuda":
            reason = why_not_capturable(model, device)
            if reason:
                raise ValueError(f"cannot capture decode steps: {reason}; set serve.decode_graphs to 'off'")
        elif model.tok_embeddings is None or model.output is None:
            raise ValueError("fixed-shape decode runs a whole model (embedding to head), not a pipeline stage")
        if not sizes or min(sizes) < 1:
            raise ValueError(f"decode graph sizes must be positive batch sizes (got {list(sizes)})")
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.scratch_block, self.mode, self.device = scratch_block, mode, device
        self.sizes = sorted(set(int(s) for s in sizes))
        self.max_blocks = max_blocks or -(-model.rope_cos.shape[0] // block_size)
        self._shapes: Dict[Tuple[int, int], _Shape] = {}
        self._pool = None
        self.replays = 0  # steps served by this path (a test reads it; the engine reports it)
        self.captures = 0

    # ------------------------------------------------------------ which steps

    def accepts(self, chunks: List[SeqChunk]) -> bool:
        """Every chunk one decode token wanting its logits, and a bucket that holds the batch."""
        if not chunks or len(chunks) > self.sizes[-1]:
            return False
        return all(len(c.token_ids) == 1 and c.needs_logits and c.num_logits == 1 for c in chunks)

    def _bucket(self, chunks: List[SeqChunk]) -> Tuple[int, int]:
        batch = self.sizes[bisect.bisect_left(self.sizes, len(chunks))]
        need = max(len(c.block_table) for c in chunks)
        width = 1
        while width < need:
            width *= 2
        return batch, max(need, min(width, self.max_blocks))  # a power of two, or the model's whole context

    # ------------------------------------------------------------ a step

    @torch.inference_mode()
    def run(self, chunks: List[SeqChunk]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """-> logits (S, V) for the S chunks, in order; expert assignments (MoE layers, E) of the real rows."""
        batch, width = self._bucket(chunks)
        shape = self._shapes.get((batch, width))
        if shape is None:
            shape = self._shapes[(batch, width)] = self._new_shape(batch, width)
        self._fill(shape, chunks)
        if self.mode == "cuda":
            if shape.graph is None:
                self._capture(shape)
                self._fill(shape, chunks)  # capture ran pad inputs through the buffers
            shape.graph.replay()
            logits, expert_ids = shape.logits, shape.expert_ids
        else:
            logits = self._forward(shape)
            expert_ids = self._expert_ids()
        self.replays += 1
        S = len(chunks)
        counts = None
        if expert_ids:
            n_experts = self._n_experts()
            counts = torch.stack([count_per_expert(ids[:S], n_experts) for ids in expert_ids])
        return logits[:S].clone(), counts

    def _forward(self, shape: _Shape) -> torch.Tensor:
        return forward_decode_static(self.model, shape.tokens, shape.positions, shape.slots, shape.tables,
                                     shape.seq_lens, self.kv_caches)

    def _new_shape(self, batch: int, width: int) -> _Shape:
        kw = dict(dtype=torch.long, device=self.device)
        return _Shape(batch, width, torch.zeros(batch, **kw), torch.zeros(batch, **kw), torch.zeros(batch, **kw),
                      torch.zeros(batch, width, dtype=torch.int32, device=self.device), torch.ones(batch, **kw))

    def _fill(self, shape: _Shape, chunks: List[SeqChunk]) -> None:
        """The step's inputs into the shape's buffers (one host-to-device copy each); pad rows after."""
        B, bs, S = shape.batch, self.block_size, len(chunks)
        scratch_slot = self.scratch_block * bs
        tokens = [c.token_ids[0] for c in chunks] + [0] * (B - S)
        positions = [c.start_pos for c in chunks] + [0] * (B - S)
        slots = [c.block_table[c.start_pos // bs] * bs + c.start_pos % bs for c in chunks] + [scratch_slot] * (B - S)
        tables = [list(c.block_table) + [self.scratch_block] * (shape.width - len(c.block_table)) for c in chunks]
        tables += [[self.scratch_block] * shape.width] * (B - S)
        lens = [c.start_pos + 1 for c in chunks] + [1] * (B - S)
        shape.tokens.copy_(torch.tensor(tokens), non_blocking=True)
        shape.positions.copy_(torch.tensor(positions), non_blocking=True)
        shape.slots.copy_(torch.tensor(slots), non_blocking=True)
        shape.tables.copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)
        shape.seq_lens.copy_(torch.tensor(lens), non_blocking=True)

    def _pad(self, shape: _Shape) -> None:
        shape.tokens.zero_()
        shape.positions.zero_()
        shape.slots.fill_(self.scratch_block * self.block_size)
        shape.tables.fill_(self.scratch_block)
        shape.seq_lens.fill_(1)

    def _capture(self, shape: _Shape) -> None:
        """Warm up on a side stream (lazy inits, allocator), then capture into the shared pool.
        Pad inputs only, so neither run writes a real sequence's cache."""
        self._pad(shape)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(shape)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            shape.logits = self._forward(shape)
        # The MoE layers' routing buffers as captured: Python does not run on replay, so the
        # layers' last_stats would point at the last shape captured, not the one replayed.
        shape.expert_ids = self._expert_ids()
        shape.graph = graph
        self.captures += 1

    def _moe_layers(self) -> List[MoE]:
        return [layer.feed_forward for layer in self.model.layers.values() if isinstance(layer.feed_forward, MoE)]

    def _expert_ids(self) -> List[torch.Tensor]:
        return [m.last_stats["expert_ids"] for m in self._moe_layers() if m.last_stats is not None]

    def _n_experts(self) -> int:
        return self._moe_layers()[0].n_experts


__all__ = ["DecodeGraphs", "MODES", "default_sizes", "why_not_capturable"]
