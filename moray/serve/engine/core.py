"""EngineCore: one step = schedule -> execute -> sample -> update -> stop checks.

    core = EngineCore(loaded, EngineConfig(...))
    core.add_request("r1", prompt_token_ids, SamplingParams(max_tokens=32))
    while core.has_unfinished_requests():
        for out in core.step(): ...          # RequestOutputs of requests that moved this step

The scheduler decides (who runs, how many tokens, who is preempted), the KV cache
manager allocates, the executor runs the model on one flat batch of chunks, the
sampler picks tokens. `n > 1` is n sequences sharing a prompt (their prompt blocks
are shared through the prefix cache), gathered back into one RequestOutput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from moray.serve.engine.config import EngineConfig
from moray.serve.engine.executor import ModelExecutor, SeqChunk
from moray.serve.engine.kv_cache import KVCacheManager
from moray.serve.engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from moray.serve.engine.request import Request, RequestStatus
from moray.serve.engine.sampling import Sampler, SamplingParams
from moray.serve.engine.scheduler import Scheduler

FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                  RequestStatus.FINISHED_ABORTED: "abort"}
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class _Group:
    """One user request: its n sequences and what they produced so far."""

    request_id: str
    prompt_token_ids: List[int]
    params: SamplingParams
    seqs: List[Request]
    metrics: RequestMetrics
    prompt: Optional[str] = None
    texts: List[str] = field(default_factory=list)
    logprobs: List[List[float]] = field(default_factory=list)
    top_logprobs: List[list] = field(default_factory=list)
    stop_reasons: List[object] = field(default_factory=list)


class EngineCore:
    def __init__(self, model, model_cfg, config: EngineConfig, tokenizer=None):
        self.config, self.model_cfg, self.tokenizer = config, model_cfg, tokenizer
        dtype = _DTYPES[config.dtype] if config.dtype else next(model.parameters()).dtype
        self.max_model_len = config.max_model_len or model_cfg.max_seq_len
        blocks = config.kv_cache_blocks or ModelExecutor.blocks_for_budget(
            model_cfg, config.kv_block_size, int(config.kv_cache_memory_mb * 2**20), dtype)
        self.executor = ModelExecutor(model, blocks, config.kv_block_size, dtype=dtype, device=config.device)
        self.kv = KVCacheManager(blocks, config.kv_block_size, enable_prefix_caching=config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_batch_tokens,
                                   max_step_latency_ms=config.max_step_latency_ms,
                                   chunked_prefill=config.chunked_prefill)
        self.sampler = Sampler()
        self.stats = EngineStats()
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self._groups: Dict[str, _Group] = {}
        self._seq_group: Dict[str, str] = {}  # sequence id -> request id
        self._generators: Dict[str, Optional[torch.Generator]] = {}

    @property
    def num_kv_blocks(self) -> int:
        return self.kv.num_blocks if hasattr(self.kv, "num_blocks") else self.executor.num_blocks

    # ------------------------------------------------------------ requests

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams,
                    prompt: Optional[str] = None, arrival_time: Optional[float] = None) -> None:
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already running; ids must be unique")
        params.validate()
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                             f"context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens")
        bad = [t for t in ids if not 0 <= t < self.model_cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.model_cfg.vocab_size - 1})")
        now = time.monotonic() if arrival_time is None else arrival_time
        seqs = []
        for i in range(params.n):
            seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
            seq = Request(seq_id, list(ids), params, arrival_time=now)
            seqs.append(seq)
            self._seq_group[seq_id] = request_id
            seed = None if params.seed is None else params.seed + i
            self._generators[seq_id] = torch.Generator().manual_seed(seed) if seed is not None else None
            self.scheduler.add_request(seq)
        self._groups[request_id] = _Group(request_id, ids, params, seqs, RequestMetrics(now), prompt,
                                          [""] * params.n, [[] for _ in seqs], [[] for _ in seqs],
                                          [None] * params.n)
        self.stats.prompt_tokens += len(ids)

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for seq in group.seqs:
            if not RequestStatus.is_finished(seq.status):
                self.scheduler.abort_request(seq.request_id)
            self._forget(seq.request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    # ------------------------------------------------------------ the step

    def step(self) -> List[RequestOutput]:
        out = self.scheduler.schedule()
        now = time.monotonic()
        for s in out.scheduled:
            g = self._groups.get(self._seq_group.get(s.request.request_id))
            if g is not None and g.metrics.first_scheduled_time is None:
                g.metrics.first_scheduled_time = now
        sampled: Dict[str, List[int]] = {}
        if out.scheduled:
            chunks = [SeqChunk(s.token_ids, s.start_pos, s.block_table, s.needs_logits) for s in out.scheduled]
            res = self.executor.execute(chunks)
            need = [s for s in out.scheduled if s.needs_logits]
            if need:
                seqs = [s.request for s in need]
                so = self.sampler.sample(res.logits.float(), [r.sampling_params for r in seqs],
                                         [r.output_token_ids for r in seqs],
                                         [self._generators.get(r.request_id) for r in seqs])
                for i, (r, tok) in enumerate(zip(seqs, so.token_ids)):
                    sampled[r.request_id] = [tok]
                    self._record_logprobs(r, so, i)
            self.scheduler.update_from_output(out, sampled)
            self.scheduler.record_step(out.num_batched_tokens, len(out.scheduled), res.seconds)
            self.stats.steps += 1
            self.stats.last_expert_tokens = (res.expert_tokens.sum(0).tolist()
                                             if res.expert_tokens is not None else None)
            self.stats.last_experts_touched = res.experts_touched
        outputs = self._check_stops(sampled)
        self._refresh_stats()
        return outputs

    def _record_logprobs(self, seq: Request, so, i: int) -> None:
        g = self._groups[self._seq_group[seq.request_id]]
        k = g.seqs.index(seq)
        if g.params.logprobs is not None and so.logprobs is not None:
            g.logprobs[k].append(so.logprobs[i])
            if so.top_logprobs is not None:
                g.top_logprobs[k].append(so.top_logprobs[i])

    def _check_stops(self, sampled: Dict[str, List[int]]) -> List[RequestOutput]:
        """Stop tokens, EOS and stop strings end a sequence (max_tokens the scheduler handles);
        one RequestOutput per request that moved."""
        now = time.monotonic()
        moved = []
        for rid, g in list(self._groups.items()):
            changed = False
            for k, seq in enumerate(g.seqs):
                if seq.request_id in sampled:
                    changed = True
                    self.stats.generation_tokens += 1
                    self._on_token(g, now)
                    if not RequestStatus.is_finished(seq.status):
                        self._maybe_stop(g, k, seq)
                elif RequestStatus.is_finished(seq.status) and seq.request_id in self._seq_group:
                    changed = True  # finished by the scheduler (aborted: it can never fit)
                if RequestStatus.is_finished(seq.status) and seq.request_id in self._seq_group:
                    self._forget(seq.request_id)
            if changed:
                moved.append(self._output(g))
                if all(RequestStatus.is_finished(s.status) for s in g.seqs):
                    g.metrics.finished_time = now
                    self.stats.e2e_latency_s.append(now - g.metrics.arrival_time)
                    del self._groups[rid]
        return moved

    def _on_token(self, g: _Group, now: float) -> None:
        m = g.metrics
        if m.first_token_time is None:
            m.first_token_time = now
            self.stats.time_to_first_token_s.append(now - m.arrival_time)
            if m.queue_time is not None:
                self.stats.queue_time_s.append(m.queue_time)
        elif m.last_token_time is not None:
            self.stats.inter_token_latency_s.append(now - m.last_token_time)
        m.last_token_time = now

    def _maybe_stop(self, g: _Group, k: int, seq: Request) -> None:
        p, tok = g.params, seq.output_token_ids[-1]
        stop_ids = set(p.stop_token_ids or [])
        if tok in stop_ids or (tok == self.eos_id and not p.ignore_eos):
            g.stop_reasons[k] = tok if tok in stop_ids else None
            self.scheduler.finish_request(seq.request_id, RequestStatus.FINISHED_STOPPED)
            return
        if self.tokenizer is None:
            return
        text = self.tokenizer.decode(seq.output_token_ids)
        stops = [p.stop] if isinstance(p.stop, str) else (p.stop or [])
        hits = [(text.find(s), s) for s in stops if s and s in text]
        if hits:
            at, s = min(hits)
            g.texts[k], g.stop_reasons[k] = text[:at], s  # the stop string is not part of the output
            self.scheduler.finish_request(seq.request_id, RequestStatus.FINISHED_STOPPED)

    def _output(self, g: _Group) -> RequestOutput:
        comps = []
        for k, seq in enumerate(g.seqs):
            text = g.texts[k] if g.stop_reasons[k] is not None and isinstance(g.stop_reasons[k], str) else (
                self.tokenizer.decode(seq.output_token_ids) if self.tokenizer is not None else "")
            comps.append(CompletionOutput(
                k, list(seq.output_token_ids), text, FINISH_REASONS.get(RequestStatus(seq.status)),
                g.stop_reasons[k], list(g.logprobs[k]) if g.params.logprobs is not None else None,
                list(g.top_logprobs[k]) if g.params.logprobs else None))
        g.metrics.num_cached_tokens = max(s.num_cached_tokens for s in g.seqs)
        g.metrics.num_preemptions = sum(s.num_preemptions for s in g.seqs)
        return RequestOutput(g.request_id, g.prompt_token_ids, comps,
                             all(RequestStatus.is_finished(s.status) for s in g.seqs), g.metrics, g.prompt)

    def _forget(self, seq_id: str) -> None:
        self._seq_group.pop(seq_id, None)
        self._generators.pop(seq_id, None)

    def _refresh_stats(self) -> None:
        s = self.stats
        s.num_requests_running, s.num_requests_waiting = self.scheduler.num_running, self.scheduler.num_waiting
        s.kv_cache_usage = self.kv.usage
        s.prefix_cache_queries, s.prefix_cache_hits = self.kv.prefix_queries, self.kv.prefix_hits
