"""Every error this server answers, written once: OpenAI's error object
(`{"error": {"message", "type", "param", "code"}}`) with the right status.

Code anywhere below the HTTP layer raises `APIError` (or a ValueError, which is a
400: the engine and SamplingParams say what was wrong in one); `install_error_handlers`
turns that, FastAPI's validation errors (wrong types, malformed JSON), Starlette's
404/405 and anything unexpected into the same object. A request never kills a
replica: the worst it gets is a 500 with a generic message (the details go to the
log, never to the client).

`APIError` crosses Ray (the LLM server raises it, the ingress answers it), so it
pickles by its fields.
"""

from __future__ import annotations

import json
import logging
from typing import Dict, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("moray.serve")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An answer other than success: status, OpenAI's type/param/code, and headers."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None, type: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def __reduce__(self):
        return _rebuild, (self.status, self.message, self.param, self.code, self.headers, self.type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _rebuild(status, message, param, code, headers, type):
    return APIError(status, message, param=param, code=code, headers=headers, type=type)


def bad_request(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param)


def overloaded(retry_after_s: float) -> APIError:
    return APIError(429, "this replica's queue is full; retry after the Retry-After header's seconds",
                    code="queue_full", headers={"Retry-After": str(max(1, round(retry_after_s)))})


def unavailable(message: str) -> APIError:
    return APIError(503, message, code="engine_unavailable")


def as_api_error(err: BaseException) -> APIError:
    """Any exception -> the APIError to answer (unexpected ones: a logged 500)."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, ValueError):  # the engine's and SamplingParams' messages name the field
        return bad_request(str(err))
    log.exception("unexpected error while serving a request", exc_info=err)
    return APIError(500, "internal server error; the server log has the details", code="internal_error")


def _param(loc) -> Optional[str]:
    parts = [str(p) for p in loc if p not in ("body",)]
    # pydantic names union branches after their types ("str", "list[int]"): not part of the field's path
    parts = [p for p in parts if not (p in ("str", "int", "float", "bool") or p.startswith(("list[", "function-")))]
    return ".".join(parts) or None


def _validation_error(err: RequestValidationError) -> APIError:
    errors = err.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = e.get("ctx", {}).get("error", "")
            return bad_request(f"the request body is not valid JSON ({detail}); send a JSON object")
    first = errors[0] if errors else {}
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") != "missing":
        return bad_request("the request body must be a JSON object, sent with Content-Type: application/json")
    param = _param(first.get("loc", ()))
    msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = f"{param or 'a field'} is required"
    elif param:
        msg = f"{param}: {msg}"
        if "input" in first and not isinstance(first["input"], (dict, list)):
            msg += f" (got {json.dumps(first['input'], default=str)[:80]})"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return bad_request(msg, param)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: APIError):
        return exc.response()

    async def on_validation(_: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    async def on_http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404:
            message = f"no route {request.url.path}; this server has /v1/completions, /v1/chat/completions, " \
                      f"/v1/models, /health and /metrics"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return APIError(exc.status_code, message, code=_HTTP_CODES.get(exc.status_code),
                        headers=getattr(exc, "headers", None)).response()

    async def on_anything(_: Request, exc: Exception):
        return as_api_error(exc).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_anything)
