"""The in-process executor: runs the model on one step's flat batch of chunks.

    executor = ModelExecutor(model, num_blocks=1024, block_size=16)
    res = executor.execute([SeqChunk([5, 9, 2], 0, [7], True),      # a prompt
                            SeqChunk([11], 40, [3, 8, 1], True)])   # a decode at position 40
    res.logits  # (2, vocab)
    executor.execute([SeqChunk([11, 4, 4], 40, [3, 8, 1], True, num_logits=3)])  # a verify: logits at all 3

The executor owns the paged KV cache tensors (one K and one V per layer); the
KV cache manager decides which block ids a sequence holds, and a chunk brings
them here as its block table. `SeqChunk` is a plain type of its own, so the
scheduler's classes never reach the model side (the Ray executor of the next
issue ships these over the wire).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from moray.model.config import ModelConfig
from moray.model.paged import SeqChunk, allocate_kv_caches, forward_paged, moe_step_stats, prepare_step  # noqa: F401 (re-exported)
from moray.model.transformer import Transformer
from moray.serve.engine.decode_graphs import DecodeGraphs, default_sizes, why_not_capturable
from moray.serve.engine.layout import lay_out_for_serving


class ExecutorFailure(RuntimeError):
    """The executor lost its workers mid-step (a stage actor or its node died) and has rebuilt them.

    Every in-flight step is void and the KV cache is empty again (`lost_kv`): the engine core
    re-queues every running request, to be recomputed from its prompt and the tokens it already
    produced, and drops its prefix cache. `cause` says what died; `rebuild_seconds` what it cost.
    """

    def __init__(self, cause: str, rebuild_seconds: float = 0.0, lost_kv: bool = True):
        super().__init__(f"{cause} (rebuilt in {rebuild_seconds:.1f} s)")
        self.cause, self.rebuild_seconds, self.lost_kv = cause, rebuild_seconds, lost_kv


@dataclass
class StepResult:
    logits: torch.Tensor  # (sum of num_logits over chunks needing logits, vocab), in chunk order
    expert_tokens: Optional[torch.Tensor]  # (MoE layers, E) assignments per expert this step; None if dense
    experts_touched: List[int]  # distinct experts each MoE layer ran this step
    seconds: float  # wall time of the step, the device synchronised


class ModelExecutor:
    """In-process: `execute` runs a step to the end. The interface the engine core uses, which the
    Ray executor shares: num_blocks, block_size, dtype, device, kv_bytes_per_token,
    execute(chunks) -> StepResult, and, for pipelines, max_inflight steps at once through
    submit(chunks) -> handle and collect(handle) -> StepResult (collected in submission order);
    a lost worker raises ExecutorFailure from execute or collect."""

    max_inflight = 1  # steps that may be submitted before the oldest is collected

    def __init__(self, model: Transformer, num_blocks: int, block_size: int,
                 dtype: Optional[torch.dtype] = None, device=None, decode_graphs: Optional[str] = None,
                 decode_graph_sizes: Optional[List[int]] = None, max_num_seqs: int = 64):
        """decode_graphs: None = CUDA graphs for pure-decode steps where they can be captured (a CUDA
        device, bf16 experts, dropless), else the planned path; "cuda" insists; "static" runs the same
        fixed-shape steps uncaptured (the CPU's check of that path); "off" never."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be at least 1")
        self.model = model.eval()
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device) if device is not None else model.rope_cos.device
        if self.device != model.rope_cos.device:
            raise ValueError(f"the model is on {model.rope_cos.device} but the executor was asked for "
                             f"{self.device}; move the model first (model.to(device))")
        self.dtype = dtype or next(model.parameters()).dtype  # of the cache; compute stays the model's
        lay_out_for_serving(model, self.device)  # stacked and (CPU) prepacked products (layout.py)
        mode = decode_graphs
        if mode is None:
            mode = "cuda" if why_not_capturable(model, self.device) is None else "off"
        # A fixed-shape step's pad rows write into one scratch block past the manager's num_blocks.
        extra = 0 if mode == "off" else 1
        self.kv_caches = allocate_kv_caches(model, num_blocks + extra, block_size, self.dtype, self.device)
        self.decode_graphs = None if mode == "off" else DecodeGraphs(
            model, self.kv_caches, block_size, num_blocks, decode_graph_sizes or default_sizes(max_num_seqs), mode)

    @property
    def kv_bytes_per_token(self) -> int:
        """2 (K and V) x layers x KV heads x head_dim x element size: what one cached token costs."""
        k = self.kv_caches[0][0] if self.kv_caches else None
        per_layer = k.shape[2] * k.shape[3] if k is not None else 0
        return 2 * len(self.kv_caches) * per_layer * torch.empty((), dtype=self.dtype).element_size()

    @staticmethod
    def blocks_for_budget(model_cfg: ModelConfig, block_size: int, budget_bytes: int,
                          dtype: torch.dtype = torch.float32) -> int:
        """How many blocks of block_size tokens fit in budget_bytes of KV cache."""
        per_token = 2 * model_cfg.n_layers * model_cfg.n_kv_heads * model_cfg.head_dim
        per_token *= torch.empty((), dtype=dtype).element_size()
        blocks = budget_bytes // (per_token * block_size)
        if blocks < 1:
            raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block of {block_size} tokens "
                             f"({per_token * block_size} bytes each); raise the budget or lower the block size")
        return int(blocks)

    # ------------------------------------------------------------ a step

    def prepare(self, chunks: List[SeqChunk]):
        """Host-side: the flat tokens, positions and PagedBatch of a step (on the executor's device)."""
        return prepare_step(chunks, self.block_size, self.model.rope_cos.shape[0], self.device)

    def execute(self, chunks: List[SeqChunk]) -> StepResult:
        t0 = time.perf_counter()
        if not any(c.token_ids for c in chunks):
            vocab = self.model.cfg.vocab_size
            return StepResult(torch.empty(0, vocab, device=self.device), None, [], time.perf_counter() - t0)
        if self.decode_graphs is not None and self.decode_graphs.accepts(chunks):
            logits, expert_tokens = self.decode_graphs.run(chunks)
            touched = (expert_tokens > 0).sum(-1).tolist() if expert_tokens is not None else []  # one host read
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return StepResult(logits, expert_tokens, touched, time.perf_counter() - t0)
        token_ids, positions, batch = self.prepare(chunks)
        with torch.inference_mode():
            logits = forward_paged(self.model, token_ids, positions, batch, self.kv_caches)
        stats = moe_step_stats(self.model)  # its host read synchronises the device
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepResult(logits, stats.expert_tokens if stats else None, stats.experts_touched if stats else [],
                          time.perf_counter() - t0)

    def submit(self, chunks: List[SeqChunk]) -> StepResult:
        """In process there is nothing to overlap: the step runs now; collect() hands it back."""
        return self.execute(chunks)

    def collect(self, handle: StepResult) -> StepResult:
        return handle
