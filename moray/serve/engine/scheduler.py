"""The scheduler: each step, who runs and with how many tokens.

It decides; the KV cache manager allocates (vLLM V1's split). A step's batch
is a flat list of chunks, one per request, each `num_new_tokens` tokens
starting at `start_pos`: a decode is a chunk of one, a prefill a chunk of
many, a readmitted preempted request a chunk of its prompt and its own
earlier output. The policy, in order of priority:

1. Running requests that are decoding: one token each (continuous batching).
2. Running requests part way through a prompt: their next chunk.
3. Waiting requests, first come first served, while there is room under
   `max_num_seqs` and the token budget; a prompt longer than what is left
   of the budget is cut into chunks (chunked prefill). Prefix-cache hits are
   taken at admission, so only the rest of the prompt is scheduled.

Speculative decoding: `schedule(spec_token_ids)` takes the drafts proposed for
decoding requests; such a request's chunk is its last token and its drafts
(1 + k tokens, drafts cut to what is left of the budget; when its blocks do
not fit with the drafts it runs without them before anyone is preempted),
and every one of those positions gets logits. `update_from_output` then takes
1..k + 1 tokens for it (the accepted drafts and one more), appends them,
and counts as computed the tokens whose KV is right: the known ones and the
accepted drafts. A rejected draft's slot is overwritten by the next step's
chunk (positions are slots); a block allocated past the new length stays in
the table and is filled as the request grows (at most one per request), so
nothing is freed mid-request.

When a running request finds no free block, the newest running request is
preempted (its blocks freed, back to the front of the waiting queue, to be
recomputed later from all its tokens) until it fits; no waiting request is
admitted in a step that preempted. A request that cannot fit in the whole
cache, or whose prompt can never fit a step, is aborted with a reason.

With `max_step_latency_ms`, a model of the step time fitted online from
`record_step` (seconds ~ a + b*tokens + c*seqs, least squares over recent
steps) caps the step so its predicted time stays under the bound; until the
model has data the budget starts small and doubles while steps stay under.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from moray.serve.engine.kv_cache import KVCacheManager
from moray.serve.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start_pos: int  # position of token_ids[0] in the request's sequence
    token_ids: list[int]  # all_token_ids[start_pos:start_pos + num_new_tokens]
    block_table: list[int]
    needs_logits: bool  # the chunk ends at the last known token: sample after it
    # Drafts appended after the known tokens (token_ids ends with them; num_new_tokens counts
    # them): the target scores every position from the last known token on.
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_logits(self) -> int:
        return 1 + len(self.spec_token_ids) if self.needs_logits else 0

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # request ids, freed this step
    num_batched_tokens: int = 0
    aborted: list[Request] = field(default_factory=list)  # by the scheduler: they can never fit
    # max_batch_tokens, or the probe's smaller cap while the latency model has no data;
    # a fitted model's cap, which depends on the sequences too, is applied on top as the step fills
    token_budget: int = 0


@dataclass(frozen=True)
class StepTimeModel:
    """seconds ~ a + b*tokens + c*seqs, fitted over the last `num_samples` steps."""

    a: float
    b: float
    c: float
    num_samples: int

    def predict(self, tokens: int, seqs: int) -> float:
        return self.a + self.b * tokens + self.c * seqs


def fit_step_time(samples) -> Optional[StepTimeModel]:
    """Least squares of seconds on (1, tokens, seqs); None until three distinct points.

    A tiny ridge keeps the fit defined when tokens and seqs move together (all
    decode steps); coefficients are clamped at zero, since no step gets faster
    with more work.
    """
    pts = {(t, s) for t, s, _ in samples}
    if len(samples) < 3 or len(pts) < 2:
        return None
    xs = [(1.0, float(t), float(s)) for t, s, _ in samples]
    ys = [sec for _, _, sec in samples]
    ata = [[sum(x[i] * x[j] for x in xs) for j in range(3)] for i in range(3)]
    aty = [sum(x[i] * y for x, y in zip(xs, ys)) for i in range(3)]
    for i in (1, 2):
        ata[i][i] += 1e-6 * ata[i][i] + 1e-9
    a, b, c = _solve3(ata, aty)
    b, c = max(b, 0.0), max(c, 0.0)
    if b == 0.0 and c == 0.0:
        a = sum(ys) / len(ys)
    return StepTimeModel(max(a, 0.0), b, c, len(samples))


def _solve3(m: list[list[float]], v: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for a 3x3 system."""
    m = [row[:] + [rhs] for row, rhs in zip(m, v)]
    for col in range(3):
        piv = max(range(col, 3), key=lambda r: abs(m[r][col]))
        m[col], m[piv] = m[piv], m[col]
        if abs(m[col][col]) < 1e-300:
            return [0.0, 0.0, 0.0]
        for r in range(col + 1, 3):
            f = m[r][col] / m[col][col]
            for k in range(col, 4):
                m[r][k] -= f * m[col][k]
    out = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        out[r] = (m[r][3] - sum(m[r][k] * out[k] for k in range(r + 1, 3))) / m[r][r]
    return out


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_batch_tokens: int,
                 max_step_latency_ms: Optional[float] = None, chunked_prefill: bool = True,
                 latency_window: int = 64, probe_tokens: int = 16):
        if max_num_seqs < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs}, max_batch_tokens={max_batch_tokens}: "
                             "both must be at least 1")
        if max_step_latency_ms is not None and max_step_latency_ms <= 0:
            raise ValueError(f"max_step_latency_ms={max_step_latency_ms}: must be positive, or None for no bound")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_step_latency_ms = max_step_latency_ms
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest admission first; the newest is preempted first
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._aborted: list[Request] = []  # aborted by the scheduler, reported with the next output
        self._samples: deque = deque(maxlen=latency_window)  # (tokens, seqs, seconds)
        self._model: Optional[StepTimeModel] = None
        self._probe = max(1, min(probe_tokens, max_batch_tokens))

    # ------------------------------------------------------------- the queues

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler")
        if not request.prompt_token_ids:
            raise ValueError(f"request {request.request_id!r} has an empty prompt; give at least one token")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request now and free its blocks (a no-op for an unknown or finished one)."""
        if not RequestStatus.is_finished(status):
            raise ValueError(f"finish_request needs a finished status, got {RequestStatus(status).name}")
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = status

    def abort_request(self, request_id: str) -> None:
        self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def _abort(self, request: Request, reason: str) -> None:
        request.abort_reason = reason
        self.finish_request(request.request_id, RequestStatus.FINISHED_ABORTED)
        self._aborted.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ a step

    def schedule(self, spec_token_ids: Optional[dict[str, list[int]]] = None,
                 busy: frozenset = frozenset(), max_seqs: Optional[int] = None) -> SchedulerOutput:
        """spec_token_ids: request id -> drafts, for requests that are decoding (others ignored).

        busy: ids of running requests whose previous chunk is still in flight (a pipeline holds
        several steps at once); they are neither scheduled nor preempted until it comes back.
        max_seqs: at most this many sequences in this step (a pipeline splits its requests
        over the steps it keeps in flight, so that its stages overlap).
        """
        cap = max_seqs if max_seqs is not None else self.max_num_seqs
        out = SchedulerOutput(token_budget=self._token_budget())
        chunks: dict[str, tuple[Request, int]] = {}  # request id -> (request, num_new_tokens)
        drafts: dict[str, list[int]] = {}  # of the scheduled, those verifying drafts
        spec_token_ids = spec_token_ids or {}
        used = 0  # tokens scheduled so far

        def room(want: int) -> int:
            """Tokens of `want` that fit the budget with one more sequence in the step."""
            n = min(want, out.token_budget - used, self._latency_room(used, len(chunks)))
            return n if n > 0 or chunks else min(want, 1)  # at least one token of progress per step

        def preempt_newest() -> Optional[Request]:
            """The newest running request that is not in flight, preempted; None if there is none."""
            nonlocal used
            free = [i for i, r in enumerate(self.running) if r.request_id not in busy]
            if not free:
                return None
            victim = self.running.pop(free[-1])
            if victim.request_id in chunks:  # scheduled earlier this step: take it back
                used -= chunks.pop(victim.request_id)[1]
                drafts.pop(victim.request_id, None)
            self.kv.free(victim)
            victim.status = RequestStatus.PREEMPTED
            victim.num_computed_tokens = 0
            victim.num_preemptions += 1
            self.waiting.appendleft(victim)
            out.preempted.append(victim.request_id)
            return victim

        # 1 and 2: running requests, decodes first, then prefill chunks.
        idle = [r for r in self.running if r.request_id not in busy]
        decoding = [r for r in idle if r.num_tokens - r.num_computed_tokens == 1]
        prefilling = [r for r in idle if r.num_tokens - r.num_computed_tokens > 1]
        for req in decoding + prefilling:
            if len(chunks) >= cap:
                break
            if req.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if self.kv.blocks_for(req.num_tokens) > self.kv.num_usable_blocks:
                self._abort(req, self._too_large(req))
                continue
            known = req.num_tokens - req.num_computed_tokens
            spec = spec_token_ids.get(req.request_id) or [] if known == 1 else []
            n = room(known + len(spec))
            if n <= 0:
                continue  # no budget left for it this step; it keeps its blocks
            spec = spec[:n - known]
            if spec and self.kv.allocate_slots(req, n) is None:
                spec, n = [], known  # no room for the drafts: decode plainly before preempting anyone
            if not spec:
                while self.kv.allocate_slots(req, n) is None:
                    victim = preempt_newest()
                    if victim is None:  # only in-flight requests left to take from: wait for them
                        n = 0
                        break
                    if victim is req:
                        break
            if n == 0:
                continue
            if req.status == RequestStatus.RUNNING:
                chunks[req.request_id] = (req, n)
                used += n
                if spec:
                    drafts[req.request_id] = spec

        # 3: waiting requests, first come first served, unless this step preempted.
        while self.waiting and not out.preempted and len(self.running) < self.max_num_seqs and len(chunks) < cap:
            req = self.waiting[0]
            if self.kv.blocks_for(req.num_tokens) > self.kv.num_usable_blocks:
                self._abort(req, self._too_large(req))
                continue
            if not self.chunked_prefill and req.num_tokens > self.max_batch_tokens:
                self._abort(req, f"its {req.num_tokens} tokens exceed max_batch_tokens="
                                 f"{self.max_batch_tokens} and chunked prefill is off; turn "
                                 "chunked_prefill on or raise max_batch_tokens")
                continue
            hit_blocks, num_hit = self.kv.get_computed_blocks(req)
            want = req.num_tokens - num_hit
            n = room(want)
            if n < want and not self.chunked_prefill:
                if chunks:
                    break
                n = want  # alone in the step, a whole prompt may overrun the latency bound
            if n <= 0:
                break
            if self.kv.allocate_slots(req, n, hit_blocks) is None:
                break
            self.waiting.popleft()
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks[req.request_id] = (req, n)
            used += n
            # Key its blocks now: a later admission in this step with the same prefix (the next
            # of n samples, a shared system prompt) reads them instead of computing its own.
            # Safe because no request is preempted once admissions begin (the loop's condition).
            self.kv.cache_full_blocks(req, req.num_computed_tokens + n)

        for req, n in chunks.values():
            start = req.num_computed_tokens
            spec = drafts.get(req.request_id, [])
            end = start + n - len(spec)  # the known tokens end here; drafts follow
            out.scheduled.append(ScheduledRequest(
                req, n, start, req.token_ids_slice(start, end) + spec,
                self.kv.block_table(req.request_id), end == req.num_tokens, list(spec)))
        out.num_batched_tokens = used
        out.aborted, self._aborted = self._aborted, []
        return out

    def requeue_all(self) -> list[str]:
        """Every running request back to the front of the waiting queue, oldest first, its
        blocks freed, to be recomputed from its prompt and the tokens it produced (the KV cache
        was lost: the executor's workers were rebuilt). The prefix cache is dropped with it."""
        ids = []
        for req in reversed(self.running):
            self.kv.free(req)
            req.status = RequestStatus.PREEMPTED
            req.num_computed_tokens = 0
            req.num_preemptions += 1
            self.waiting.appendleft(req)
            ids.append(req.request_id)
        self.running.clear()
        self.kv.reset_prefix_cache()
        return ids[::-1]

    def _too_large(self, req: Request) -> str:
        cap = self.kv.num_usable_blocks * self.kv.block_size
        return (f"it needs {req.num_tokens} tokens of KV cache but the whole cache holds {cap} "
                f"({self.kv.num_usable_blocks} blocks of {self.kv.block_size}); shorten the prompt, "
                "lower max_tokens or give the cache more blocks")

    def update_from_output(self, output: SchedulerOutput, sampled: dict[str, list[int]]) -> None:
        """Advance every scheduled request past its chunk; append what was sampled after it.

        A request that verified k drafts takes 1..k + 1 tokens, the accepted drafts first;
        they stop at max_tokens (the rest dropped), and its computed tokens end after the
        last accepted draft (the KV of a rejected one is wrong and is overwritten next step).
        """
        for s in output.scheduled:
            req = s.request
            if req.status != RequestStatus.RUNNING:  # aborted or finished while the step ran
                continue
            spec = s.spec_token_ids
            req.num_computed_tokens += s.num_new_tokens - len(spec)
            if not s.needs_logits:
                self.kv.cache_full_blocks(req)
                continue
            new_ids = sampled.get(req.request_id)
            if not new_ids:
                raise ValueError(f"request {req.request_id!r}: its chunk ended at its last known token "
                                 "(needs_logits) but `sampled` has no token for it; sample one, or "
                                 "finish_request() it before update_from_output()")
            if len(new_ids) > len(spec) + 1 or list(new_ids[:-1]) != spec[:len(new_ids) - 1]:
                raise ValueError(f"request {req.request_id!r}: {len(new_ids)} tokens {list(new_ids)} for a chunk "
                                 f"with drafts {spec}; give the accepted drafts, in order, then one token")
            max_tokens = getattr(req.sampling_params, "max_tokens", None)
            take = list(new_ids) if max_tokens is None else list(new_ids[:max(1, max_tokens - req.num_output_tokens)])
            req.append_output_token_ids(take)
            req.num_computed_tokens += len(take) - 1  # the accepted drafts' KV is in the cache
            self.kv.cache_full_blocks(req)
            if max_tokens is not None and req.num_output_tokens >= max_tokens:
                self.finish_request(req.request_id, RequestStatus.FINISHED_LENGTH)

    # ---------------------------------------------------- the latency bound

    def record_step(self, num_tokens: int, num_seqs: int, seconds: float) -> None:
        """Feed the step-time model one measured step."""
        if num_tokens <= 0:
            return
        self._samples.append((num_tokens, num_seqs, seconds))
        if self.max_step_latency_ms is not None:
            if seconds * 1000.0 <= self.max_step_latency_ms:
                self._probe = min(self.max_batch_tokens, self._probe * 2)
            else:
                self._probe = max(1, self._probe // 2)
        self._model = fit_step_time(self._samples)

    @property
    def latency_model(self) -> Optional[StepTimeModel]:
        """The fitted step-time model (a, b, c in seconds), or None before it has data."""
        return self._model

    def _token_budget(self) -> int:
        if self.max_step_latency_ms is None:
            return self.max_batch_tokens
        if self._model is None or self._model.b == 0.0:
            return self._probe  # conservative until measured
        return self.max_batch_tokens  # _latency_room does the rest, knowing the seqs

    def _latency_room(self, tokens: int, seqs: int) -> int:
        """More tokens that fit under the bound with one more sequence in the step."""
        m = self._model
        if self.max_step_latency_ms is None or m is None or m.b == 0.0:
            return self.max_batch_tokens
        spare = self.max_step_latency_ms / 1000.0 - m.predict(tokens, seqs + 1)
        return int(spare / m.b) if spare > 0 else 0
