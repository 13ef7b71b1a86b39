"""Sending a request to regions: one attempt, then the next region, within a deadline.

    answer = await upstream.first(plan, "POST", "/v1/completions", body, deadline)
    answer.kind: ok | client_error | saturated | failed        (None: nothing could be tried)

Every way an attempt can end becomes an `Answer` in one place (`attempt`), which also tells
the region's breaker and the metrics:

    2xx                   ok: a success for the breaker
    400, 404, 413, 422..  client_error: the client's request is wrong; passed on as it is, never
                          retried (it would be wrong everywhere) and never a region failure
    401, 403              failed: the client's key was checked here, so the region is refusing
                          the router (its upstream key, regions[].api_key_env, is wrong)
    429                   saturated: the region is full; skipped for its Retry-After, tried
                          elsewhere (spill-over); not a failure
    5xx, 408, no answer   failed: connection refused or reset, timeouts, an engine that died

`first` tries the plan in order, one region at a time: a request is never at two regions at
once, unless router.hedge_after_ms is set; then a request that has no answer after that long
is also sent to the next region, the first answer wins and the other is cancelled (closing
its connection aborts it there). Streams are never hedged.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import aiohttp

from moray.serve.router.region import RegionState

# Everything a region can do to a request on the wire: refuse or reset the connection, cut
# a body short, say nothing for too long.
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError)


@dataclass
class Answer:
    kind: str  # ok | client_error | saturated | failed
    region: RegionState
    status: int = 0
    body: bytes = b""
    headers: Dict[str, str] = field(default_factory=dict)
    why: str = ""  # what went wrong (failed / saturated)
    retry_after_s: Optional[float] = None
    response: Optional[aiohttp.ClientResponse] = None  # an open stream (stream=True and ok)

    async def close(self) -> None:
        """Let go of an open stream. One read to its end has given its connection back to the
        pool already; an unfinished one's connection is closed, so the region sees the client
        gone and aborts the request."""
        if self.response is not None:
            response, self.response = self.response, None
            self.region.in_flight -= 1
            response.close()


def classify(status: int) -> str:
    if status < 400:
        return "ok"
    if status == 429:
        return "saturated"
    if status in (401, 403) or status == 408 or status >= 500:
        return "failed"
    return "client_error"


def describe(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, asyncio.TimeoutError) and not text:
        text = "no answer in time"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def error_message(body: bytes, limit: int = 200) -> str:
    """The message of OpenAI's error object in a body, or the body's start."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode("utf-8", "replace").strip()
    return message[:limit]


def _retry_after(headers) -> Optional[float]:
    try:
        return float(headers.get("retry-after"))
    except (TypeError, ValueError):
        return None


class Upstream:
    def __init__(self, settings, session: aiohttp.ClientSession, metrics):
        self.settings, self.session, self.metrics = settings, session, metrics

    def _timeout(self, deadline: float, stream: bool) -> aiohttp.ClientTimeout:
        """Non-streamed: all of it within the deadline. Streamed: the answer's headers within the
        deadline, then each read within stream_idle_timeout_s (a silent stream counts as cut)."""
        left = max(0.001, deadline - time.monotonic())
        connect = min(self.settings.connect_timeout_s, left)
        if stream:
            return aiohttp.ClientTimeout(total=None, sock_connect=connect,
                                         sock_read=self.settings.stream_idle_timeout_s)
        return aiohttp.ClientTimeout(total=left, sock_connect=connect)

    async def attempt(self, region: RegionState, method: str, path: str, content: Optional[bytes], deadline: float,
                      stream: bool = False) -> Optional[Answer]:
        """One request at one region; None when its breaker has no room for it now."""
        if not region.breaker.acquire():
            return None
        region.in_flight += 1
        region.requests += 1
        t0 = time.perf_counter()
        keep_open = False
        try:
            response = await self.session.request(method, region.url + path, data=content, headers=region.headers,
                                                  timeout=self._timeout(deadline, stream))
            status = response.status
            kind = classify(status)
            if stream and kind == "ok":
                keep_open = True
                region.success()
                self.metrics.latency[region.name].observe(time.perf_counter() - t0)
                return Answer("ok", region, status, response=response)
            try:
                body = await response.read()
            finally:
                response.release()
            answer = Answer(kind, region, status, body, {k: response.headers[k] for k in ("content-type", "retry-after")
                                                          if k in response.headers})
        except TRANSPORT_ERRORS as err:
            answer = Answer("failed", region, why=describe(err))
        finally:
            region.breaker.release()
            if not keep_open:
                region.in_flight -= 1
        seconds = time.perf_counter() - t0
        if answer.kind in ("ok", "client_error"):
            region.success()  # it answered as it should; a bad request is not its failure
        elif answer.kind == "saturated":
            answer.retry_after_s = _retry_after(answer.headers)
            answer.why = f"answered 429: {error_message(answer.body)}"
            region.refused(answer.retry_after_s)
        else:
            if answer.status:
                answer.why = f"answered {answer.status}: {error_message(answer.body)}"
            region.failure(answer.why)
        self.metrics.attempt(region.name, answer.kind, seconds)
        return answer

    async def first(self, plan: List, method: str, path: str, content: Optional[bytes], deadline: float,
                    stream: bool = False) -> "Outcome":
        """Try the plan's regions until one answers (ok or the client's error)."""
        if self.settings.hedge_after_ms and not stream:
            return await self._hedged(plan, method, path, content, deadline)
        outcome = Outcome()
        for route in plan:
            if time.monotonic() >= deadline:
                break
            answer = await self.attempt(route.region, method, path, content, deadline, stream)
            if answer is None:
                continue
            outcome.note_failover(self.metrics)
            if outcome.add(answer):
                return outcome
        return outcome

    async def _hedged(self, plan: List, method: str, path: str, content: Optional[bytes],
                      deadline: float) -> "Outcome":
        outcome, routes, pending = Outcome(), iter(plan), {}  # pending: task -> its region
        delay = self.settings.hedge_after_ms / 1e3

        def launch() -> Optional[RegionState]:
            route = next(routes, None)
            if route is not None:
                task = asyncio.ensure_future(self.attempt(route.region, method, path, content, deadline))
                pending[task] = route.region
            return route and route.region

        launch()
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait = min(delay, left) if len(pending) == 1 else left
                done, _ = await asyncio.wait(pending, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # the one in flight is slow: ask the next region too
                    slow = next(iter(pending.values()))
                    if launch() is not None:
                        self.metrics.hedges[slow.name].inc()
                    continue
                for task in done:
                    pending.pop(task)
                    answer = task.result()
                    if answer is not None:
                        outcome.note_failover(self.metrics)
                        if outcome.add(answer):
                            return outcome
                if not pending:  # every one in flight failed: the next region now, without waiting
                    launch()
            return outcome
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


class Outcome:
    """The answers of one request's attempts: the one to give, and what the others said."""

    def __init__(self):
        self.answer: Optional[Answer] = None  # ok or client_error
        self.refusals: List[Answer] = []  # saturated or failed, in order
        self._leaving: Optional[tuple] = None

    def add(self, answer: Answer) -> bool:
        """True when this answer is the one to give the client."""
        if answer.kind in ("ok", "client_error"):
            self.answer = answer
            return True
        self.refusals.append(answer)
        self._leaving = (answer.region.name, "spill" if answer.kind == "saturated" else "retry")
        return False

    def note_failover(self, metrics) -> None:
        """A new attempt after a refusal: that request failed over (counted on the region it left)."""
        if self._leaving is not None:
            metrics.failover(*self._leaving)
            self._leaving = None

    @property
    def all_saturated(self) -> bool:
        return bool(self.refusals) and all(a.kind == "saturated" for a in self.refusals)

    def summary(self) -> str:
        return "; ".join(f"{a.region.name}: {a.why}" for a in self.refusals)
