"""One rank of a serving gang: its stage of the model, its KV cache, and one engine step at a time.

    layout = ServeLayout(pp=2, ep=2)                       # 4 ranks, torch.distributed already up
    runner = StageRunner("out/tiny-moray", None, layout, rank, num_blocks=256, block_size=16)
    out = runner.step(chunks)        # the same SeqChunk list on every rank, in the same order
    out.logits                       # last stage's (tp 0, ep 0) rank: (rows, vocab); else None

No Ray here: the Ray stage actors (moray/actors/serve_stage.py) start the process group and
drive a StageRunner each. What a rank holds and why is serving_build.py's docstring.

The data path of a step: every rank turns the chunk list into tokens, positions and block
tables itself (executor.prepare_step is a function of the chunks alone), so the engine only
ever ships token ids and block tables, never KV data. Stage 0 embeds the tokens; stage s > 0
receives the (T, d_model) hidden states from stage s - 1's rank with the same (tp, ep)
coordinates; a stage that is not the last sends its output to stage s + 1's. Activations are
replicated over tp and ep inside a stage, so each of its ranks has its own peer and no
stage-wide gather is needed. Sends are point-to-point on the default group (gloo on the CPU,
NCCL on a GPU) and asynchronous: stage 0 may run step i + 1 while stage 1 still runs step i,
and messages between one pair of ranks arrive in the order sent, so steps stay FIFO. The
receiver knows T from the chunks and D from the config; the dtype is the stage's compute dtype.
`step_handoff` is the same step with the activations handed in and out by the caller instead
(a Ray compiled graph's channels: moray/actors/serve_graph.py, measured against this path and
not the default; moray/actors/serve_gang.py says why).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from moray.model.config import ModelConfig
from moray.model.paged import allocate_kv_caches, forward_paged, moe_step_stats
from moray.model.safetensors_io import CheckpointError
from moray.parallel.dims import LayoutError
from moray.parallel.serving_build import ServeLayout, build_stage, stage_layers, stage_report
from moray.model.paged import SeqChunk, prepare_step

MAX_PENDING_SENDS = 8  # sends in flight before the next step waits for the oldest


@dataclass
class StageOutput:
    logits: Optional[torch.Tensor]  # (rows, vocab) on the CPU, only from the last stage's (tp 0, ep 0) rank
    expert_tokens: Optional[torch.Tensor]  # (this stage's MoE layers, E) int64 on the CPU, summed over ep
    stage: int
    seconds: float  # this rank's wall time for the step, waiting on the previous stage included


class StageRunner:
    """This rank's stage: weights (its layers, experts and tensor shard only) and paged KV cache.

    Attributes: layers (global layer ids), stage, is_first, is_last, model, kv_caches, dtype
    (weights, compute and cache), kv_bytes_per_token, weight_bytes (both of this rank)."""

    def __init__(self, path: str, model_cfg: Optional[ModelConfig], layout: ServeLayout, rank: int,
                 num_blocks: int, block_size: int, dtype: Optional[torch.dtype] = None, device="cpu"):
        """`path`: anything load_for_serving takes; `model_cfg` only for a checkpoint without a run
        config beside it. `dtype` None keeps the stored dtype. Collective: every rank of the gang
        constructs its runner at the same time (the tp and ep groups are created here)."""
        from moray.serve.engine.loader import LoadError, open_source  # the weight stores: only here

        _check_world(layout, rank)
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be at least 1")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype}: serving needs a floating-point dtype (bfloat16, float16, float32)")
        self.layout, self.rank, self.coords = layout, rank, layout.coords(rank)
        self.device = torch.device(device)
        src = open_source(path, model_cfg=model_cfg)
        self.cfg = src.cfg
        layout.validate(self.cfg)
        meshes = layout.dims().build_mesh(self.device.type)
        try:
            self.model = build_stage(src, layout, rank, meshes.group("tp"), meshes.group("ep"), dtype, self.device)
        except CheckpointError as e:
            raise LoadError(f"cannot serve {path}: {e}") from None
        self.stage = self.coords.pp
        self.layers = stage_layers(self.cfg, layout.pp)[self.stage]
        self.is_first, self.is_last = self.stage == 0, self.stage == layout.pp - 1
        # Weights may be stored in mixed dtypes; activations cross stages in the projections' dtype.
        self.dtype = self.model.layers[str(self.layers[0])].attention.wq.weight.dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_caches = allocate_kv_caches(self.model, num_blocks, block_size, self.dtype, self.device)
        self._leader = self.coords.tp == 0 and self.coords.ep == 0
        c = self.coords
        self._prev = None if self.is_first else layout.rank_of(self.stage - 1, c.ep, c.tp)
        self._next = None if self.is_last else layout.rank_of(self.stage + 1, c.ep, c.tp)
        self._sends: List[tuple] = []  # (work, tensor) of sends not known to be done

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(k.shape[2] * k.shape[3] * k.element_size() + v.shape[2] * v.shape[3] * v.element_size()
                   for k, v in self.kv_caches)

    @property
    def weight_bytes(self) -> int:
        unique = {id(p): p for p in self.model.parameters()}.values()  # a tied head counts once
        return sum(p.numel() * p.element_size() for p in unique)

    # ------------------------------------------------------------ a step

    def step(self, chunks: List[SeqChunk]) -> Optional[StageOutput]:
        """Run this rank's part of one engine step; a StageOutput on each stage's (tp 0, ep 0) rank."""
        return self._run(chunks, self._recv, self._send)

    def step_handoff(self, chunks: List[SeqChunk], hidden: Optional[torch.Tensor] = None
                     ) -> Tuple[Optional[StageOutput], Optional[torch.Tensor]]:
        """The same step with the activations handed in and out by the caller (a Ray compiled
        graph's channels) instead of sent over torch.distributed: `hidden` is the previous stage's
        (T, D) output (None on the first stage); returns (what step returns, this stage's (T, D)
        output for the next one, None on the last stage or an empty step)."""
        sent: List[torch.Tensor] = []
        out = self._run(chunks, lambda n_tokens: hidden.to(self.device, self.dtype),
                        lambda h: sent.append(h.to(self.dtype).contiguous()))
        return out, (sent[0] if sent else None)

    def _run(self, chunks: List[SeqChunk], receive: Callable[[int], torch.Tensor],
             send: Callable[[torch.Tensor], None]) -> Optional[StageOutput]:
        t0 = time.perf_counter()
        self._reap_sends()
        n_tokens = sum(len(c.token_ids) for c in chunks)
        if n_tokens == 0:  # every rank sees the same chunks: nobody sends, nobody waits
            logits = torch.empty(0, self.cfg.vocab_size, dtype=self.dtype) if self.is_last else None
            return StageOutput(logits, None, self.stage, time.perf_counter() - t0) if self._leader else None
        tokens, positions, batch = prepare_step(chunks, self.block_size, self.model.rope_cos.shape[0], self.device)
        x = tokens if self.is_first else receive(n_tokens)
        with torch.inference_mode():
            h = forward_paged(self.model, x, positions, batch, self.kv_caches)  # logits, or (T, D) hidden
        if not self.is_last:
            send(h)
        if not self._leader:
            return None
        stats = moe_step_stats(self.model)  # its host read synchronises the device
        logits = h.cpu() if self.is_last else None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StageOutput(logits, stats.expert_tokens.cpu() if stats else None, self.stage,
                           time.perf_counter() - t0)

    def _recv(self, n_tokens: int) -> torch.Tensor:
        buf = torch.empty(n_tokens, self.cfg.d_model, dtype=self.dtype, device=self.device)
        dist.recv(buf, src=self._prev)
        return buf

    def _send(self, h: torch.Tensor) -> None:
        h = h.to(self.dtype).contiguous()
        self._sends.append((dist.isend(h, dst=self._next), h))  # h lives until the send is done

    def _reap_sends(self) -> None:
        self._sends = [(w, t) for w, t in self._sends if not w.is_completed()]
        while len(self._sends) >= MAX_PENDING_SENDS:
            self._sends.pop(0)[0].wait()

    def flush(self) -> None:
        """Wait until every send of this rank has gone (before tearing the process group down)."""
        for work, _ in self._sends:
            work.wait()
        self._sends = []

    def reset_cache(self) -> None:
        """Zero the KV cache (correctness never needs it: a block is written before it is read)."""
        for k, v in self.kv_caches:
            k.zero_()
            v.zero_()


def _check_world(layout: ServeLayout, rank: int) -> None:
    if not dist.is_initialized():
        raise RuntimeError("StageRunner needs torch.distributed initialised (the stage actor does it; alone: "
                           "dist.init_process_group('gloo' or 'nccl', rank=..., world_size=...))")
    if dist.get_world_size() != layout.world_size or dist.get_rank() != rank:
        raise LayoutError(f"the process group has world size {dist.get_world_size()} and this is rank "
                          f"{dist.get_rank()}, but the runner was given rank {rank} of pp {layout.pp} x ep "
                          f"{layout.ep} x tp {layout.tp} = {layout.world_size} ranks")


__all__ = ["ServeLayout", "StageOutput", "StageRunner", "stage_report"]
