"""EngineCore: one step = schedule -> execute -> sample -> update -> stop checks.

    core = EngineCore(loaded, EngineConfig(...))
    core.add_request("r1", prompt_token_ids, SamplingParams(max_tokens=32))
    while core.has_unfinished_requests():
        for out in core.step(): ...          # RequestOutputs of requests that moved this step

The scheduler decides (who runs, how many tokens, who is preempted), the KV cache
manager allocates, the executor runs the model on one flat batch of chunks, the
sampler picks tokens. `n > 1` is n sequences sharing a prompt (their prompt blocks
are shared through the prefix cache), gathered back into one RequestOutput.

With speculative decoding on (`speculative_method`), a step starts with the drafter
proposing up to k tokens for each decoding request (n-grams of its own tokens, or a
draft model kept in step with the target); the scheduler gives such a request its last
token and the drafts as one chunk, the target scores all of them in the step's one
pass, and `verify` (the rejection rule on the request's processed distribution) emits
1..k + 1 tokens, cut at a stop token, a stop string or max_tokens. Requests that ask
for logprobs decode plainly. `stats.spec` counts drafted and accepted tokens.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from moray.serve.engine.config import EngineConfig
from moray.serve.engine.detokenizer import IncrementalDetokenizer
from moray.serve.engine.executor import ExecutorFailure, ModelExecutor, SeqChunk
from moray.serve.engine.kv_cache import KVCacheManager
from moray.serve.engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from moray.serve.engine.request import Request, RequestStatus
from moray.serve.engine.sampling import Sampler, SamplingParams
from moray.serve.engine.scheduler import Scheduler
from moray.serve.engine.speculative import (DraftModelDrafter, NgramDrafter, SpecStats, draft_histories,
                                            processed_probs, verify)

log = logging.getLogger(__name__)
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
    detoks: List[IncrementalDetokenizer] = field(default_factory=list)  # each sequence's text so far


class EngineCore:
    def __init__(self, model, model_cfg, config: EngineConfig, tokenizer=None, draft_model=None,
                 draft_model_cfg=None, executor=None):
        """draft_model / draft_model_cfg: an in-memory draft for speculative_method "draft"
        (else config.draft_model is loaded). executor: one built elsewhere (the Ray stage gang,
        ray_executor.py), with its KV cache sized already; `model` is then None."""
        self.config, self.model_cfg, self.tokenizer = config, model_cfg, tokenizer
        self.max_model_len = config.max_model_len or model_cfg.max_seq_len
        if executor is None:
            dtype = _DTYPES[config.dtype] if config.dtype else next(model.parameters()).dtype
            blocks = config.kv_cache_blocks or ModelExecutor.blocks_for_budget(
                model_cfg, config.kv_block_size, int(config.kv_cache_memory_mb * 2**20), dtype)
            executor = ModelExecutor(model, blocks, config.kv_block_size, dtype=dtype, device=config.device,
                                     decode_graphs=config.decode_graphs,
                                     decode_graph_sizes=config.decode_graph_sizes, max_num_seqs=config.max_num_seqs)
        dtype, blocks = executor.dtype, executor.num_blocks
        self.executor = executor
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
        self.drafter = self._build_drafter(blocks, dtype, draft_model, draft_model_cfg)
        self.spec_stats: SpecStats = self.stats.spec
        self._proposals: Dict[str, tuple] = {}  # seq id -> (num_tokens when proposed, drafts, probs or None)
        # Steps submitted and not yet collected (a pipelined executor). Speculative decoding
        # proposes from the last token, so it runs one step at a time.
        self._inflight: deque = deque()
        self._pipelined = getattr(executor, "max_inflight", 1) > 1 and self.drafter is None

    def _build_drafter(self, blocks: int, dtype, draft_model, draft_model_cfg):
        c = self.config
        if c.speculative_method is None:
            return None
        if c.speculative_method == "ngram":
            return NgramDrafter(c.ngram_min_n, c.ngram_max_n, c.speculative_tokens)
        if draft_model is None:
            if c.draft_model is None:
                raise ValueError("speculative_method 'draft' needs a draft model: set serve.draft_model to a "
                                 "smaller model's path (same vocabulary as the target), or use 'ngram'")
            from moray.serve.engine.loader import load_for_serving

            loaded = load_for_serving(c.draft_model, dtype=dtype, device=c.device)
            draft_model, draft_model_cfg = loaded.model, loaded.config
        draft_vocab = draft_model_cfg.vocab_size if draft_model_cfg is not None else draft_model.cfg.vocab_size
        if draft_vocab != self.model_cfg.vocab_size:
            raise ValueError(f"the draft model's vocabulary has {draft_vocab} ids but the target's "
                             f"{self.model_cfg.vocab_size}; a draft must share the target's tokenizer and "
                             f"vocabulary (serve.draft_model = {c.draft_model!r})")
        # The draft's cache: as many blocks as the target's (a smaller model: fewer bytes each).
        return DraftModelDrafter(draft_model, blocks, c.kv_block_size, c.speculative_tokens, dtype=dtype,
                                 device=c.device, enable_prefix_caching=c.enable_prefix_caching)

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
                                          [None] * params.n,
                                          [IncrementalDetokenizer(self.tokenizer) for _ in seqs])
        self.stats.prompt_tokens += len(ids)

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for seq in group.seqs:
            if not RequestStatus.is_finished(seq.status):
                self.scheduler.abort_request(seq.request_id)
            self._forget(seq.request_id)

    def shutdown(self) -> None:
        """Release the executor's workers, if it has any (the Ray stage gang)."""
        stop = getattr(self.executor, "shutdown", None)
        if stop is not None:
            stop()

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    # ------------------------------------------------------------ the step

    def step(self) -> List[RequestOutput]:
        """One engine step: the outputs of the requests that moved. With a pipelined executor
        (max_inflight > 1) a call tops the pipeline up with new steps and completes the oldest."""
        if self._pipelined:
            return self._step_pipelined()
        draft_seconds = self._propose() if self.drafter is not None else 0.0
        out = self._schedule(frozenset())
        sampled: Dict[str, List[int]] = {}
        if out.scheduled:
            try:
                res = self.executor.execute(self._chunks(out))
            except ExecutorFailure as err:
                self._recover(err)
                return self._finish_step({})
            sampled = self._apply(out, res, draft_seconds)
        return self._finish_step(sampled)

    def _step_pipelined(self) -> List[RequestOutput]:
        """Keep up to max_inflight steps in the pipeline, each over requests no other in-flight
        step holds (a request's next token needs its last one), then complete the oldest."""
        while len(self._inflight) < self.executor.max_inflight:
            busy = frozenset(s.request_id for o, _ in self._inflight for s in o.scheduled)
            # Share what can run now over the free pipeline slots, so every slot gets work.
            ready = len(self.scheduler.running) - len(busy) + len(self.scheduler.waiting)
            slots = self.executor.max_inflight - len(self._inflight)
            out = self._schedule(busy, max_seqs=max(1, -(-ready // slots)))
            if not out.scheduled:
                break
            self._inflight.append((out, self.executor.submit(self._chunks(out))))
        if not self._inflight:
            return self._finish_step({})
        out, handle = self._inflight.popleft()
        try:
            res = self.executor.collect(handle)
        except ExecutorFailure as err:
            self._recover(err)
            return self._finish_step({})
        return self._finish_step(self._apply(out, res, 0.0))

    def _schedule(self, busy: frozenset, max_seqs: Optional[int] = None):
        out = self.scheduler.schedule({rid: p[1] for rid, p in self._proposals.items()}, busy=busy,
                                      max_seqs=max_seqs)
        for rid in out.preempted:  # recomputed from scratch later: so is its draft
            self._drop_draft(rid)
        now = time.monotonic()
        for s in out.scheduled:
            g = self._groups.get(self._seq_group.get(s.request.request_id))
            if g is not None and g.metrics.first_scheduled_time is None:
                g.metrics.first_scheduled_time = now
        return out

    @staticmethod
    def _chunks(out) -> List[SeqChunk]:
        return [SeqChunk(s.token_ids, s.start_pos, s.block_table, s.needs_logits, max(1, s.num_logits))
                for s in out.scheduled]

    def _apply(self, out, res, draft_seconds: float) -> Dict[str, List[int]]:
        """Sample (or verify drafts) from a finished step's logits and advance its requests."""
        sampled: Dict[str, List[int]] = {}
        need = [s for s in out.scheduled if s.needs_logits]
        starts, row = [], 0  # each chunk's first logits row
        for s in need:
            starts.append(row)
            row += s.num_logits
        plain = [(s, r) for s, r in zip(need, starts) if not s.spec_token_ids]
        live = [(s, r) for s, r in plain if s.request.status == RequestStatus.RUNNING]  # not aborted meanwhile
        if live:
            seqs = [s.request for s, _ in live]
            so = self.sampler.sample(res.logits[[r for _, r in live]].float(), [r.sampling_params for r in seqs],
                                     [r.output_token_ids for r in seqs],
                                     [self._generators.get(r.request_id) for r in seqs])
            for i, (r, tok) in enumerate(zip(seqs, so.token_ids)):
                sampled[r.request_id] = [tok]
                self._record_logprobs(r, so, i)
        spec = [(s, r) for s, r in zip(need, starts) if s.spec_token_ids]
        if spec:
            sampled.update(self._verify(spec, res.logits))
        self.scheduler.update_from_output(out, sampled)
        for s in need:  # verified (or decoded without its drafts): the proposal is used up
            self._commit_draft(s.request_id, len(sampled.get(s.request_id, ())) - 1 if s.spec_token_ids else 0)
        self.scheduler.record_step(out.num_batched_tokens, len(out.scheduled), res.seconds + draft_seconds)
        self.stats.steps += 1
        self.stats.last_expert_tokens = (res.expert_tokens.sum(0).tolist()
                                         if res.expert_tokens is not None else None)
        self.stats.last_experts_touched = res.experts_touched
        return sampled

    def _finish_step(self, sampled: Dict[str, List[int]]) -> List[RequestOutput]:
        outputs = self._check_stops(sampled)
        self._refresh_stats()
        return outputs

    def _recover(self, err: ExecutorFailure) -> None:
        """The executor lost its workers and rebuilt them with an empty KV cache: every step in
        flight is void, and every running request goes back to the queue, to be recomputed from its
        prompt and the tokens it already produced (so its output does not change)."""
        self._inflight.clear()
        requeued = self.scheduler.requeue_all()
        for rid in requeued:
            self._drop_draft(rid)
        self.stats.executor_failures += 1
        self.stats.recoveries.append({"cause": err.cause, "rebuild_seconds": err.rebuild_seconds,
                                      "requeued": len(requeued), "time": time.time()})
        log.warning("executor failure: %s; rebuilt in %.1f s, %d running requests re-queued",
                    err.cause, err.rebuild_seconds, len(requeued))

    # ------------------------------------------------------------ speculative decoding

    def _propose(self) -> float:
        """Drafts for every decoding request that has none for its current length; seconds spent."""
        k_max, todo, ks = self.config.speculative_tokens, [], []
        for req in self.scheduler.running:
            rid, n = req.request_id, req.num_tokens
            if n - req.num_computed_tokens != 1:
                continue  # mid-prefill (or readmitted after preemption): nothing to draft after yet
            p = req.sampling_params
            k = min(k_max, p.max_tokens - req.num_output_tokens - 1, self.max_model_len - n)
            prop = self._proposals.get(rid)
            if prop is not None and prop[0] == n:
                continue  # proposed earlier, not scheduled since: still valid
            self._proposals.pop(rid, None)
            if p.logprobs is not None or k < 1:
                continue  # logprobs: plain decoding (one distribution per token, read from the sampler)
            todo.append(req)
            ks.append(k)
        if not todo:
            return 0.0
        if isinstance(self.drafter, NgramDrafter):
            for req, k in zip(todo, ks):
                d = self.drafter.propose(req.all_token_ids)[:k]
                if d:
                    self._proposals[req.request_id] = (req.num_tokens, d, None)
            return 0.0
        before = self.drafter.seconds
        got = self.drafter.propose(todo, ks, [self._generators.get(r.request_id) for r in todo])
        for req, (d, q) in zip(todo, got):
            if d:
                self._proposals[req.request_id] = (req.num_tokens, d, q)
        return self.drafter.seconds - before

    def _verify(self, spec, logits: torch.Tensor) -> Dict[str, List[int]]:
        """The target's rows for each verified chunk -> its emitted tokens, cut at a stop."""
        params, hists, rows = [], [], []
        for s, r in spec:
            hs = draft_histories(s.request.output_token_ids, s.spec_token_ids)
            params += [s.request.sampling_params] * len(hs)
            hists += hs
            rows += range(r, r + len(hs))
        probs = processed_probs(logits[rows], params, hists)  # (rows, V)
        target, drafts, qs, at = [], [], [], 0
        for s, _ in spec:
            k = len(s.spec_token_ids)
            target.append(probs[at:at + k + 1])
            at += k + 1
            drafts.append(s.spec_token_ids)
            q = self._proposals[s.request_id][2]
            qs.append(q[:k] if q is not None else None)
        reqs = [s.request for s, _ in spec]
        emitted = verify(target, drafts, qs, [r.sampling_params.greedy for r in reqs],
                         [self._generators.get(r.request_id) for r in reqs], self.config.speculative_leniency)
        out = {}
        for r, d, e in zip(reqs, drafts, emitted):
            self.spec_stats.record(len(d), len(e))
            out[r.request_id] = self._cut_at_stop(r, e)
        s = self.stats
        s.spec_drafted, s.spec_accepted = self.spec_stats.drafted, self.spec_stats.accepted
        return out

    def _cut_at_stop(self, seq: Request, tokens: List[int]) -> List[int]:
        """Emitted tokens up to and including the first that ends the sequence (a stop token,
        EOS, or the one that completes a stop string), as plain decoding would stop."""
        p = seq.sampling_params
        stop_ids = set(p.stop_token_ids or [])
        for i, tok in enumerate(tokens):
            if tok in stop_ids or (tok == self.eos_id and not p.ignore_eos):
                return tokens[:i + 1]
        stops = [x for x in ([p.stop] if isinstance(p.stop, str) else (p.stop or [])) if x]
        if stops and self.tokenizer is not None:
            for i in range(len(tokens) - 1):
                text = self.tokenizer.decode(seq.output_token_ids + tokens[:i + 1])
                if any(x in text for x in stops):
                    return tokens[:i + 1]
        return tokens

    def _commit_draft(self, seq_id: str, num_accepted: int) -> None:
        prop = self._proposals.pop(seq_id, None)
        if prop is not None and isinstance(self.drafter, DraftModelDrafter):
            self.drafter.commit(seq_id, prop[0], len(prop[1]), num_accepted)

    def _drop_draft(self, seq_id: str) -> None:
        self._proposals.pop(seq_id, None)
        if isinstance(self.drafter, DraftModelDrafter):
            self.drafter.free(seq_id)

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
                    self.stats.generation_tokens += len(sampled[seq.request_id])
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
        detok = g.detoks[k]
        delta = detok.update(seq.output_token_ids)
        stops = [x for x in ([p.stop] if isinstance(p.stop, str) else (p.stop or [])) if x]
        if not delta or not stops:
            return
        text = detok.text
        # Earlier text held no stop string, so the first one ends within the new characters.
        hits = [(i, s) for s in stops if (i := text.find(s, max(0, len(text) - len(delta) - len(s) + 1))) >= 0]
        if hits:
            at, s = min(hits)
            g.texts[k], g.stop_reasons[k] = text[:at], s  # the stop string is not part of the output
            self.scheduler.finish_request(seq.request_id, RequestStatus.FINISHED_STOPPED)

    def _output(self, g: _Group) -> RequestOutput:
        comps = []
        for k, seq in enumerate(g.seqs):
            if isinstance(g.stop_reasons[k], str):
                text = g.texts[k]  # cut before its stop string
            elif self.tokenizer is None:
                text = ""
            elif RequestStatus.is_finished(seq.status):
                text = g.detoks[k].final(seq.output_token_ids)
            else:
                g.detoks[k].update(seq.output_token_ids)  # a no-op when _maybe_stop already read them
                text = g.detoks[k].text
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
        self._drop_draft(seq_id)

    def _refresh_stats(self) -> None:
        s = self.stats
        s.num_requests_running, s.num_requests_waiting = self.scheduler.num_running, self.scheduler.num_waiting
        s.kv_cache_usage = self.kv.usage
        s.prefix_cache_queries, s.prefix_cache_hits = self.kv.prefix_queries, self.kv.prefix_hits
