"""The LLM server: one engine, behind OpenAI's request and response shapes.

    server = LLMServer.from_path("runs/demo", ServeConfig(...))   # or LLMServer(engine, serve_cfg)
    body = await server.complete(request)          # a CompletionRequest / ChatCompletionRequest -> JSON
    async for event in server.stream(request): ... # "" once accepted, then SSE events, then [DONE]
    await server.health(), server.metrics_snapshot(), server.metrics_text(), server.model_card()

No HTTP and no Ray here: the FastAPI app (moray/serve/openai/api.py) calls it in the
same process in tests and in `bench/serve_http.py`, and the Ray Serve deployment
(moray/serve/app.py) wraps it, one per replica, so both run this very code.

Admission is a bound on sequences: up to max_num_seqs run and max_queue wait; a
request that would go past that is refused at once with 429 and Retry-After (queueing
it would only make every request late). A request leaves the count when its stream
ends, however it ends: finished, failed, or closed because the client went away, in
which case closing the engine's stream aborts the request and frees its KV blocks on
the engine's next turn.

A stream hands the request to the engine before it says "accepted": the engine starts on
the prompt while the acceptance travels to the caller (through Ray Serve, a hop and back),
so the first token does not wait for that round trip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import AsyncIterator, Dict, List, Optional, Union

from moray.serve.engine.config import EngineConfig
from moray.serve.openai import protocol as p
from moray.serve.openai.errors import APIError, overloaded, unavailable
from moray.serve.openai.metrics import EngineMetrics
from moray.serve.openai.serving import DONE, Formatter, Job, Limits, error_event, generate, prepare_chat, \
    prepare_completion

log = logging.getLogger("moray.serve")
AnyRequest = Union[p.CompletionRequest, p.ChatCompletionRequest]


def engine_overrides(serve, draft: Optional[str] = None) -> Dict:
    """The engine's settings from the config's serve section (the keys they share by name)."""
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    out = {n: getattr(serve, n) for n in names if hasattr(serve, n)}
    if draft:
        out["draft_model"] = draft
    return out


class LLMServer:
    def __init__(self, engine, serve, model_name: Optional[str] = None, source: str = "", replica: str = ""):
        self.engine, self.serve = engine, serve
        self.model_name = model_name or serve.model_name
        self.source = source
        core = engine.core
        self.tokenizer = core.tokenizer
        self.limits = Limits(core.max_model_len, core.model_cfg.vocab_size, serve.max_tokens_default,
                             serve.max_tokens_limit, serve.max_n)
        self.capacity = serve.max_num_seqs + serve.max_queue  # sequences admitted at once
        self.in_flight = 0
        self.replica = replica
        self.metrics = EngineMetrics(self.model_name, replica)

    @classmethod
    def from_path(cls, path: str, serve, draft: Optional[str] = None, replica: str = "") -> "LLMServer":
        from moray.serve.engine.llm import AsyncLLMEngine

        return cls(AsyncLLMEngine.from_path(path, **engine_overrides(serve, draft)), serve, source=path,
                   replica=replica)

    # ---------------------------------------------------------------- requests

    def _prepare(self, request: AnyRequest) -> Job:
        self._check_alive()
        if isinstance(request, p.ChatCompletionRequest):
            return prepare_chat(request, self.tokenizer, self.limits)
        return prepare_completion(request, self.tokenizer, self.limits)

    def _admit(self, job: Job) -> None:
        if self.in_flight + job.num_sequences > self.capacity:
            raise overloaded(self.serve.retry_after_s)
        self.in_flight += job.num_sequences

    def _release(self, job: Job, outputs: List) -> None:
        self.in_flight -= job.num_sequences
        for out in outputs:
            for c in (out.outputs if out is not None else []):
                self.metrics.record_finish(c.finish_reason or "abort")
        self.metrics.absorb(self.engine.core.stats)

    async def complete(self, request: AnyRequest) -> str:
        """The whole answer's JSON body."""
        job = self._prepare(request)
        self._admit(job)
        finals: List = [None] * len(job.prompts)
        try:
            async for i, out in generate(self.engine, job):
                finals[i] = out
        except RuntimeError as err:  # the engine stopped under this request
            raise unavailable(str(err)) from None
        finally:
            self._release(job, finals)
        return Formatter(job, self.tokenizer, self.model_name).response(finals)

    async def stream(self, request: AnyRequest) -> AsyncIterator[str]:
        """"" as soon as the request is accepted (so a caller can answer 200 or the error
        before any token), then SSE events ending with `data: [DONE]`."""
        job = self._prepare(request)
        self._admit(job)
        finals: List = [None] * len(job.prompts)
        fmt = Formatter(job, self.tokenizer, self.model_name)
        outputs = generate(self.engine, job)
        first = asyncio.ensure_future(outputs.__anext__())  # the engine takes the request now
        events = _after(first, outputs)
        try:
            yield ""
            for event in fmt.first_chunks():
                yield event
            try:
                async for i, out in events:
                    finals[i] = out
                    for event in fmt.chunks(i, out):
                        yield event
            except (RuntimeError, ValueError) as err:  # the stream already said 200: an error event
                yield error_event(unavailable(str(err)) if isinstance(err, RuntimeError) else
                                  APIError(400, str(err)))
                yield DONE
                return
            if job.include_usage:
                yield fmt.usage_chunk(finals)
            yield DONE
        finally:
            try:
                await events.aclose()
                await _settle(first)  # before closing `outputs`: its first step may still be running there
                await outputs.aclose()  # a stream closed early aborts the engine request
            finally:
                self._release(job, finals)

    # ---------------------------------------------------------------- state

    def _check_alive(self) -> None:
        alive, reason = self.alive()
        if not alive:
            raise unavailable(f"the engine is not running ({reason}); this replica is unhealthy and will be "
                              f"replaced, retry shortly")

    def alive(self) -> tuple:
        """(alive, why): the engine thread runs, and its executor's workers (a gang of stage actors) live."""
        engine = self.engine
        if not engine.is_running:
            return False, f"engine stopped: {engine.error}" if engine.error else "engine stopped"
        executor = getattr(engine.core, "executor", None)
        health = getattr(executor, "health", None)
        if callable(health):
            try:
                h = health()
            except Exception as err:  # noqa: BLE001 - a gang that cannot say how it is, is not alive
                return False, f"the executor's health check failed: {err}"
            if not h.get("alive", True):
                return False, str(h.get("reason") or h.get("detail") or "the executor's workers are dead")
        return True, "ok"

    async def health(self) -> Dict:
        alive, reason = self.alive()
        return {"alive": alive, "reason": reason, "in_flight": self.in_flight, "capacity": self.capacity,
                **({"replica": self.replica} if self.replica else {})}

    async def metrics_snapshot(self) -> Dict:
        """This replica's numbers as plain data (the Serve ingress merges every replica's)."""
        return self.metrics.snapshot(self.engine.core)

    async def metrics_text(self) -> str:
        return self.metrics.render(self.engine.core)

    async def model_card(self) -> Dict:
        return p.ModelCard(id=self.model_name, root=self.source or None,
                           max_model_len=self.limits.max_model_len).model_dump()

    def stop_engine(self) -> None:
        """Stop this replica's engine: requests in flight fail with 503, /health answers 503, and
        Serve's health check replaces the replica (an operator's drain; how tests kill an engine)."""
        self.engine.shutdown()


async def _after(first: "asyncio.Future", rest: AsyncIterator) -> AsyncIterator:
    """The items of `rest` whose first step `first` (a task) already took."""
    try:
        yield await first
    except StopAsyncIteration:
        return
    async for item in rest:
        yield item


async def _settle(task: "asyncio.Future") -> None:
    """Cancel `task` if it still runs and wait for it to end; its outcome is taken either way (an
    error the stream already reported, or one nobody is left to hear)."""
    if not task.done():
        task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - see above
        pass
