"""The router's HTTP face: one address in front of moray Serve endpoints in several regions.

    app = build_router(load_regions("regions.yaml"))     # `moray route --config regions.yaml`
    uvicorn.run(app, host=..., port=...)

    POST /v1/completions, /v1/chat/completions   sent to the best region (policy.py), failed
                                                 over (upstream.py), streams resumed (stream.py)
    GET  /v1/models                              the first region that answers
    GET  /health                                 200 while some region can take requests, else 503
    GET  /regions                                the region table: each region's state and why
                                                 (with a client's key, when keys are set)
    GET  /metrics                                the router's Prometheus metrics (metrics.py)

It speaks the endpoint's API: the same keys (moray/serve/openai/auth.py, checked here by
the endpoint's ASGI guard, with its body-size limit), the same error object
(moray/serve/openai/errors.py), and a region's answers passed on as they are. A client
names its region with `x-moray-region` (a region's name or location) and a conversation
with `x-moray-session`; every answer says where it was served in `x-moray-region` and
why there in `x-moray-route`.

A non-streamed body goes to the region byte for byte; the router reads only what routing
needs from it (stream, n, the prompt's start). The HTTP client is one pooled
aiohttp.ClientSession, made with the probe task in the app's lifespan. (aiohttp rather
than httpx: on these 2 shared cores httpx's AsyncClient spent ~1.5 ms of CPU per request,
its bare transport ~1.0 ms, aiohttp ~0.55 ms; a proxy's CPU is its added latency once
cores are busy, and the goal is under 2 ms.)
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from contextlib import asynccontextmanager
from typing import Optional

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from moray.serve.openai.api import SSE_HEADERS, EventStream, Guard
from moray.serve.openai.auth import APIKeys
from moray.serve.openai.errors import APIError, bad_request, install_error_handlers, unavailable
from moray.serve.router.metrics import CONTENT_TYPE, RouterMetrics
from moray.serve.router.policy import Policy, prefix_key
from moray.serve.router.probe import Prober
from moray.serve.router.region import RegionState
from moray.serve.router.stream import StreamRelay
from moray.serve.router.upstream import Outcome, Upstream

REGION_HEADER, SESSION_HEADER, ROUTE_HEADER = "x-moray-region", "x-moray-session", "x-moray-route"
KINDS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


def parse_body(raw: bytes) -> dict:
    """The request's JSON object, or the endpoint's own 400 for what is not one."""
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise bad_request(f"the request body is not valid JSON ({err}); send a JSON object") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object, sent with Content-Type: application/json")
    return body


class Router:
    """Routing state and the request path; one per app, used only on its event loop."""

    def __init__(self, cfg, environ=os.environ, clock=time.monotonic):
        self.settings = cfg.router
        keys = cfg.upstream_keys(environ)
        self.regions = {r.name: RegionState(r, self.settings, keys[r.name], clock) for r in cfg.regions}
        self.policy = Policy(self.settings, self.regions, clock)
        self.metrics = RouterMetrics(self.regions)
        self.session: Optional[aiohttp.ClientSession] = None
        self.upstream: Optional[Upstream] = None
        self.prober: Optional[Prober] = None
        self._probing: Optional[asyncio.Task] = None
        self._background: set = set()

    async def start(self) -> None:
        # No pool limit of our own: the regions bound their work (429s); a pool cap would only
        # queue requests here, where no one measures the wait. Idle connections go after 4 s,
        # before a server's own keep-alive ends (uvicorn's is 5 s, Ray Serve's 90 s): reusing one
        # the region is closing would look like a region failure. Probes keep one per region warm.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0))
        self.upstream = Upstream(self.settings, self.session, self.metrics)
        self.prober = Prober(self.settings, self.regions, self.session)
        await self.prober.round()  # know the regions before the first request
        self._probing = asyncio.ensure_future(self.prober.run())

    def in_background(self, coroutine) -> None:
        """Run a short task that no request waits for (held here, so it is not collected)."""
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def stop(self) -> None:
        for task in [self._probing, *self._background]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._probing, *self._background] if t is not None],
                             return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    # ---------------------------------------------------------------- requests

    async def generate(self, request: Request, path: str) -> Response:
        raw = await request.body()
        body = parse_body(raw)
        route_args = (request.headers.get(REGION_HEADER), request.headers.get(SESSION_HEADER),
                      prefix_key(body, self.settings.affinity))
        plan = self.policy.plan(*route_args)
        if not plan:
            raise self._none_up()
        deadline = time.monotonic() + self.settings.request_deadline_s
        if body.get("stream") is True:
            return await self._stream(path, body, plan, route_args, deadline)
        outcome = await self.upstream.first(plan, "POST", path, raw, deadline)
        answer = self._answer_or_raise(outcome)
        if answer.kind == "ok":
            self.policy.served(answer.region, *route_args[1:])
        headers = {REGION_HEADER: answer.region.name, ROUTE_HEADER: self._reason(plan, answer.region)}
        if "retry-after" in answer.headers:
            headers["retry-after"] = answer.headers["retry-after"]
        return Response(answer.body, status_code=answer.status, headers=headers,
                        media_type=answer.headers.get("content-type", "application/json"))

    async def _stream(self, path: str, body: dict, plan, route_args, deadline) -> Response:
        relay = StreamRelay(self, path, KINDS[path], body, route_args)
        outcome = await self.upstream.first(plan, "POST", path, relay.content(), deadline, stream=True)
        answer = self._answer_or_raise(outcome)
        if answer.kind != "ok":  # the client's error, with its status line, before any event
            return Response(answer.body, status_code=answer.status,
                            media_type=answer.headers.get("content-type", "application/json"),
                            headers={REGION_HEADER: answer.region.name})
        self.policy.served(answer.region, *route_args[1:])
        headers = {**SSE_HEADERS, REGION_HEADER: answer.region.name, ROUTE_HEADER: self._reason(plan, answer.region)}
        return EventStream(relay.start(answer), media_type="text/event-stream", headers=headers)

    async def get(self, path: str) -> Response:
        """A GET any region can answer (/v1/models): the first that does."""
        plan = self.policy.plan()
        if not plan:
            raise self._none_up()
        outcome = await self.upstream.first(plan, "GET", path, None, time.monotonic() + self.settings.probe_timeout_s)
        answer = self._answer_or_raise(outcome)
        return Response(answer.body, status_code=answer.status, headers={REGION_HEADER: answer.region.name},
                        media_type=answer.headers.get("content-type", "application/json"))

    # ---------------------------------------------------------------- errors

    def _answer_or_raise(self, outcome: Outcome):
        if outcome.answer is not None:
            return outcome.answer
        if outcome.all_saturated:
            wait = min((a.retry_after_s for a in outcome.refusals if a.retry_after_s is not None), default=1.0)
            raise APIError(429, f"every region is full ({outcome.summary()}); retry after the Retry-After header's "
                                f"seconds", code="queue_full", headers={"Retry-After": str(max(1, round(wait)))})
        if not outcome.refusals:
            raise self._none_up()
        raise unavailable(f"no region could answer the request ({outcome.summary()}); GET /regions shows each "
                          f"region's state; retry shortly")

    def _none_up(self) -> APIError:
        wait = min((r.breaker.seconds_to_trial() for r in self.regions.values()), default=1.0)
        err = unavailable(f"no region can take requests now: every region's circuit breaker is open (GET /regions "
                          f"says why); the next trial is in {wait:.1f} s")
        err.headers["Retry-After"] = str(max(1, round(wait)))
        return err

    @staticmethod
    def _reason(plan, region: RegionState) -> str:
        first = plan[0].region is region
        reason = next((r.reason for r in plan if r.region is region), "failover")
        return reason if first else f"failover:{reason}"

    # ---------------------------------------------------------------- state

    def table(self) -> dict:
        return {"router_region": self.settings.region, "regions": [r.row() for r in self.regions.values()],
                "sessions": len(self.policy.sessions), "prefixes": len(self.policy.prefixes)}

    def available(self) -> int:
        return sum(r.breaker.allows() for r in self.regions.values())


def build_router(cfg, keys: Optional[APIKeys] = None, environ=os.environ) -> FastAPI:
    """The router app for a RegionsConfig (moray/serve/router/config.py). `keys`: the clients'
    API keys (default: MORAY_API_KEYS and router.api_keys_file, read here)."""
    router = Router(cfg, environ)
    keys = keys if keys is not None else APIKeys.load(cfg.router.api_keys_file, environ)

    @asynccontextmanager
    async def lifespan(_app):
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="moray router", summary="One address in front of moray endpoints in several regions",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = router
    install_error_handlers(app)
    app.add_middleware(Guard, keys=keys, max_body_bytes=cfg.router.max_request_bytes)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await router.generate(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await router.generate(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models():
        return await router.get("/v1/models")

    @app.get("/health")
    async def health():
        up = router.available()
        if not up:
            raise router._none_up()
        return {"status": "ok", "regions_available": up, "regions": len(router.regions)}

    @app.get("/regions")
    async def regions(request: Request):
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # it names the regions' addresses: for clients with a key (when keys are set)
        keys.check(key.strip() if scheme.lower() == "bearer" else None)
        return JSONResponse(router.table())

    @app.get("/metrics")
    async def metrics():
        return Response(router.metrics.render(), media_type=CONTENT_TYPE)

    return app
