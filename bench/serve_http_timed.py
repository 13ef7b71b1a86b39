"""The Ray Serve app of bench/serve_http_hops.py: moray's own serving code (moray/serve/app.py's
ServeEngineClient and FastAPI app, moray/serve/server.py's LLMServer) in deployments that note
the time at each step of a request and send it back as SSE comment lines (`: hops {...}`),
which OpenAI clients skip. A module of its own so Ray pickles these classes by name (the
replicas import it from bench/, which the runner puts on their PYTHONPATH).

Times are time.monotonic(): CLOCK_MONOTONIC, one clock for every process on the machine.
"""

from __future__ import annotations

import contextvars
import json
import time

from ray import serve

from moray.serve.app import ServeEngineClient
from moray.serve.openai.api import build_api
from moray.serve.server import LLMServer

ARRIVED = contextvars.ContextVar("arrived", default=None)  # when the ingress's ASGI app saw the request
MARK = ": hops "  # the SSE comment that carries a layer's times

def is_token(event: str) -> bool:
    return '"text":"' in event and '"text":""' not in event


class _TimedEngine:
    """The engine, noting when the first output reached the replica's event loop."""

    def __init__(self, engine):
        self.engine, self.core, self.first = engine, engine.core, None

    def __getattr__(self, name):
        return getattr(self.engine, name)

    @property
    def is_running(self):
        return self.engine.is_running

    async def generate(self, request_id, ids, params):
        async for out in self.engine.generate(request_id, ids, params):
            if self.first is None and out.outputs[0].token_ids:
                m = out.metrics
                self.first = {"arrival": m.arrival_time, "scheduled": m.first_scheduled_time,
                              "first_token": m.first_token_time, "replica_got": time.monotonic()}
            yield out


@serve.deployment(name="LLMServer", max_ongoing_requests=64)
class TimedLLMServer:
    def __init__(self, checkpoint: str, serve_cfg):
        import torch

        torch.set_num_threads(1)
        self.server = LLMServer.from_path(checkpoint, serve_cfg)
        self.server.engine = self.timed = _TimedEngine(self.server.engine)

    async def stream(self, request):
        arrived, noted = time.monotonic(), False
        self.timed.first = None  # one request at a time
        async for event in self.server.stream(request):
            yield event
            if not noted and is_token(event):
                noted = True
                yield MARK + json.dumps({"replica": arrived, "replica_sent": time.monotonic(), **self.timed.first}) \
                    + "\n\n"

    async def model_card(self):
        return await self.server.model_card()


class _TimedClient(ServeEngineClient):
    def __init__(self, handle, retry_after_s: float, direct: bool):
        super().__init__(handle, retry_after_s)
        if not direct:  # Serve's own handle settings, as the app had them before
            self.handle = handle
            self.streams = handle.options(stream=True)

    async def stream(self, request):
        route, noted = time.monotonic(), False
        async for event in super().stream(request):
            yield event
            if not noted and is_token(event):
                noted = True
                yield MARK + json.dumps({"asgi": ARRIVED.get(), "route": route, "ingress_got": time.monotonic()}) \
                    + "\n\n"


def timed_api(client, serve_cfg):
    """moray's FastAPI app, noting when each request reaches it. (A module-level function: Ray
    pickles the class being decorated below by value, and a ContextVar does not pickle.)"""
    from moray.serve.openai.auth import APIKeys

    app = build_api(client, serve_cfg, keys=APIKeys([]))

    async def noted(scope, receive, send):
        ARRIVED.set(time.monotonic())
        await app(scope, receive, send)

    return noted


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class TimedIngress:
    def __init__(self, llm_server, serve_cfg, direct: bool):
        self.client, self.serve_cfg = _TimedClient(llm_server, serve_cfg.retry_after_s, direct), serve_cfg

    def __serve_build_asgi_app__(self):
        return timed_api(self.client, self.serve_cfg)


VARIANTS = {"serve_defaults": False, "moray": True}  # app name -> the ingress uses direct_handle
