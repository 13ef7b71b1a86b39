"""The HTTP face: a FastAPI app speaking OpenAI's API over an injected engine client.

    app = build_api(client, serve_cfg)     # client: an LLMServer here, or the Serve handle's
    uvicorn.run(app, ...)                  # wrapper (moray/serve/app.py) in the ingress replica

    POST /v1/completions, POST /v1/chat/completions   (stream: true -> server-sent events)
    GET  /v1/models, GET /health (503 when the engine or its gang is dead), GET /metrics

The client is anything with `complete`, `stream`, `health`, `metrics_text` and
`model_card` as `LLMServer` has them, so tests run this app on a real engine without
Ray, and the Ray Serve ingress runs the very same app with a handle behind it.

Before a route sees a request, one ASGI guard checks the API key on /v1 (401 first,
so nothing about a request is answered to someone without a key) and reads the body
up to serve.max_request_bytes (413 past it, without reading the rest). A stream is
answered 200 only once the LLM server has accepted it, so a refused request (400,
429, 503) always gets its status line; a client that goes away mid-stream makes
Starlette (or Serve's proxy) cancel the response, which closes the client's stream and
aborts the engine request.
"""

from __future__ import annotations

from typing import Optional

import anyio
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moray.serve.openai import protocol as p
from moray.serve.openai.auth import APIKeys
from moray.serve.openai.errors import APIError, install_error_handlers, unavailable
from moray.serve.openai.metrics import CONTENT_TYPE

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream(StreamingResponse):
    """Server-sent events that stop the moment the client goes away, and always close their
    source. Starlette (ASGI 2.4) would notice a gone client only at the next write, and then
    leave the generator to the garbage collector; a request waiting in the queue writes
    nothing, so it would hold its place until its first token."""

    async def __call__(self, scope, receive, send):
        try:
            async with anyio.create_task_group() as tasks:
                async def stream():
                    try:
                        await self.stream_response(send)
                    except OSError:  # the client is gone; nothing more to send
                        pass
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tasks.cancel_scope.cancel()
        finally:
            await self.body_iterator.aclose()


class Guard:
    """ASGI middleware: API keys on /v1, then the request body's size limit."""

    def __init__(self, app, keys: APIKeys, max_body_bytes: int):
        self.app, self.keys, self.max_body = app, keys, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if _route_path(scope).startswith("/v1") and self.keys.enabled:
            try:
                self.keys.check(_bearer(scope))
            except APIError as err:
                return await err.response()(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await _too_large(self.max_body)(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await _too_large(self.max_body)(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():  # the body once, then the real channel (disconnects)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _route_path(scope) -> str:
    """The path below where the app is mounted: behind a prefix (a Serve route_prefix, uvicorn's
    root_path) `path` starts with `root_path`, and /v1 must be guarded there too."""
    path, root = scope["path"], scope.get("root_path") or ""
    return path[len(root):] if root and path.startswith(root) else path


def _header(scope, name: bytes) -> Optional[str]:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1").strip()
    return None


def _bearer(scope) -> Optional[str]:
    scheme, _, key = (_header(scope, b"authorization") or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def _too_large(limit: int) -> JSONResponse:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                         f"(serve.max_request_bytes)", code="request_too_large").response()


def build_api(client, serve, keys: Optional[APIKeys] = None) -> FastAPI:
    """`serve`: the config's serve section (model_name, max_request_bytes, api_keys_file);
    `keys`: the API keys (default: MORAY_API_KEYS and serve.api_keys_file, read here)."""
    keys = keys if keys is not None else APIKeys.load(serve.api_keys_file)
    app = FastAPI(title="moray", summary="OpenAI-compatible inference for moray's MoE models",
                  docs_url="/docs", redoc_url=None)
    install_error_handlers(app)
    app.add_middleware(Guard, keys=keys, max_body_bytes=serve.max_request_bytes)

    def check_model(name: str) -> None:
        if name != serve.model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {serve.model_name!r} "
                                f"(GET /v1/models)", param="model", code="model_not_found")

    async def answer(body):
        check_model(body.model)
        if not body.stream:
            return Response(await client.complete(body), media_type="application/json")
        events = client.stream(body)
        try:
            await events.__anext__()  # accepted (or raises: 400, 429, 503 with a status line)
        except BaseException:
            await events.aclose()
            raise

        async def relay():
            try:
                async for event in events:
                    if event:
                        yield event
            finally:
                await events.aclose()  # closing the LLM server's stream aborts the engine request

        return EventStream(relay(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/completions", response_model=p.CompletionResponse, responses={400: {"model": p.ErrorResponse}})
    async def completions(body: p.CompletionRequest):
        return await answer(body)

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse,
              responses={400: {"model": p.ErrorResponse}})
    async def chat_completions(body: p.ChatCompletionRequest):
        return await answer(body)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models():
        return p.ModelList(data=[p.ModelCard(**await client.model_card())])

    @app.get("/health", responses={503: {"model": p.ErrorResponse}})
    async def health():
        try:
            state = await client.health()
        except APIError:
            raise
        except Exception as err:  # noqa: BLE001 - no replica answered: that is the answer
            raise unavailable(f"no LLM server replica answered ({type(err).__name__}: {err})") from None
        if not state.get("alive"):
            raise unavailable(f"the engine is not running: {state.get('reason')}")
        return {"status": "ok", **state}

    @app.get("/metrics")
    async def metrics():
        return Response(await client.metrics_text(), media_type=CONTENT_TYPE)

    return app
