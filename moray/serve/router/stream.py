"""Relaying a stream, and carrying it on from another region when its region is lost.

The client sees one stream. The router asks the region for token ids (`return_token_ids`,
vLLM's extension; taken out again unless the client asked too) and keeps the ids of what it
has passed on. The endpoint sends ids only with their whole text (never half a character,
never the start of what may be a stop string), so those ids decode to exactly the text the
client has. When the stream is cut (connection lost, no event for
router.stream_idle_timeout_s, an error event from a dying engine, an end without `[DONE]`):

  nothing passed on yet   the request starts again at the next region (restart)
  tokens passed on        the next region is sent the same request with `continue_token_ids`
                          = those ids (resume): it starts from prompt + ids with what is left
                          of max_tokens, cuts stop strings over the whole output, counts usage
                          as one request, and sends no second role chunk; the router gives its
                          chunks the first stream's id, so a greedy stream is token for token
                          the one an undisturbed region would have sent
  the choice finished     only the usage chunk (if asked for) and [DONE] were missing: the
                          router writes them itself

A stream that cannot be resumed (n > 1, or several prompts) is restarted while nothing was
passed on, and otherwise ends with OpenAI's error object as an event, then [DONE]. Each
region is tried at most once per stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import AsyncIterable, AsyncIterator, List, Optional

from moray.serve.openai.errors import APIError, unavailable
from moray.serve.router.upstream import TRANSPORT_ERRORS, Answer, describe

DONE = b"data: [DONE]\n\n"


async def sse_data(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The data of each server-sent event in a body's chunks, as bytes (a partial event at a
    cut is dropped)."""
    buf = b""
    async for chunk in chunks:
        buf += chunk
        if b"\r" in buf:  # CRLF line ends, possibly split between chunks (the \r waits in buf)
            buf = buf.replace(b"\r\n", b"\n")
        while True:
            end = buf.find(b"\n\n")
            if end < 0:
                break
            event, buf = buf[:end], buf[end + 2:]
            lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:
                yield b"\n".join(lines)


def resumable(body: dict, kind: str) -> bool:
    """One sequence: n = 1 and (completions) a single prompt."""
    if body.get("n", 1) != 1:
        return False
    if kind == "chat":
        return True
    p = body.get("prompt")
    return isinstance(p, str) or (isinstance(p, list) and bool(p) and (isinstance(p[0], int) or len(p) == 1))


class Cut(Exception):
    """The stream broke at the region's end; the message says how."""


class StreamRelay:
    """An async iterator of the client's events (`relay.start(answer)`, then iterate), whose
    aclose() always lets go of the region's stream, even when closed before its first event
    (a generator that never started would skip its `finally`)."""

    def __init__(self, router, path: str, kind: str, body: dict, route_args: tuple):
        self.router, self.path, self.kind, self.body = router, path, kind, body
        self.route_args = route_args  # (client region, session, prefix) for re-planning
        self.resumable = resumable(body, kind)
        self.client_ids = body.get("return_token_ids") is True
        self.before: List[int] = list(body.get("continue_token_ids") or [])  # the client's own continuation
        self.sent_ids: List[int] = []
        self.prompt_len: Optional[int] = None
        self.forwarded = False  # an event went to the client
        self.finished = False  # the (one) choice sent its finish_reason
        self.usage_sent = False
        self.first: Optional[dict] = None  # id, created, model of the first stream
        self.resumed = False
        self.tried: List[str] = []
        self.current: Optional[Answer] = None  # the region's stream being relayed
        self._events: Optional[AsyncIterator[bytes]] = None

    def start(self, answer: Answer) -> "StreamRelay":
        self.current = answer
        self._events = self._relay()
        return self

    def __aiter__(self) -> "StreamRelay":
        return self

    async def __anext__(self) -> bytes:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        try:
            await self._events.aclose()
        finally:
            if self.current is not None:
                await self.current.close()

    def content(self, resume: bool = False) -> bytes:
        body = dict(self.body)
        if self.resumable:
            body["return_token_ids"] = True
        if resume:
            body["continue_token_ids"] = self.before + self.sent_ids
        return json.dumps(body).encode()

    # ---------------------------------------------------------------- events

    def rewrite(self, data: bytes) -> bytes:
        """An event as the client gets it: ids noted (and dropped unless asked for), the first
        stream's id on a resumed one. Raises Cut on an error event from a failing region."""
        if data.startswith(b'{"error"'):
            error = json.loads(data).get("error") or {}
            if error.get("type") == "server_error":
                raise Cut(f"error event: {error.get('message')}")
            return b"data: " + data + b"\n\n"  # the request's own fault: the client's to see
        if not self.resumable:  # restarted at most, never resumed: nothing to note or change
            return b"data: " + data + b"\n\n"
        obj = json.loads(data)
        if self.first is None:
            self.first = {k: obj.get(k) for k in ("id", "created", "model", "object")}
        elif self.resumed:
            obj["id"], obj["created"] = self.first["id"], self.first["created"]
        prompt = obj.pop("prompt_token_ids", None) if not self.client_ids else obj.get("prompt_token_ids")
        for choice in obj.get("choices") or ():
            ids = choice.get("token_ids") if self.client_ids else choice.pop("token_ids", None)
            if ids:
                self.sent_ids.extend(ids)
            p = choice.get("prompt_token_ids") if self.client_ids else choice.pop("prompt_token_ids", None)
            prompt = p if p is not None else prompt
            if choice.get("finish_reason"):
                self.finished = True
        if prompt is not None:
            self.prompt_len = len(prompt)
        if obj.get("usage") and not obj.get("choices"):
            self.usage_sent = True
        return _event(obj)

    def closing_events(self) -> List[bytes]:
        """The end of a stream whose choice finished before the cut: usage (if asked for), [DONE]."""
        out = []
        options = self.body.get("stream_options") or {}
        if options.get("include_usage") and not self.usage_sent and self.prompt_len is not None and self.first:
            done = len(self.before) + len(self.sent_ids)
            out.append(_event({**self.first, "choices": [], "usage": {
                "prompt_tokens": self.prompt_len, "completion_tokens": done, "total_tokens": self.prompt_len + done}}))
        return out + [DONE]

    # ---------------------------------------------------------------- the stream

    async def _relay(self) -> AsyncIterator[bytes]:
        """What the client receives, from the region in `current` and whichever take over."""
        router, current = self.router, self.current
        self.tried.append(current.region.name)
        while True:
            try:
                started = time.perf_counter()
                async for data in sse_data(current.response.content.iter_any()):
                    if data == b"[DONE]":
                        break
                    out = self.rewrite(data)
                    self.forwarded = True
                    yield out
                else:
                    raise Cut("the stream ended without [DONE]")
                router.metrics.attempt(current.region.name, "ok")
                router.in_background(_drain(current))  # the client may leave at [DONE]; its end may not
                current = self.current = None
                yield DONE
                return
            except (*TRANSPORT_ERRORS, Cut, ValueError) as err:  # ValueError: an event that is not JSON
                why = f"stream cut after {time.perf_counter() - started:.1f} s ({describe(err)})"
                current.region.failure(why)
                router.metrics.attempt(current.region.name, "failed")
            finally:
                if current is not None:  # a client that left closes the region's stream here (idempotent)
                    await current.close()
            if self.finished:
                for event in self.closing_events():
                    yield event
                return
            taken = await self._take_over(current.region.name, why)
            if isinstance(taken, APIError):
                yield b"data: " + json.dumps(taken.body()).encode() + b"\n\n"
                yield DONE
                return
            current = self.current = taken

    async def _take_over(self, lost: str, why: str):
        """The next region's open stream, or the APIError to end the client's stream with."""
        router = self.router
        if not self.forwarded:
            kind, content = "restart", self.content()
        elif self.resumable:
            kind, content = "resume", self.content(resume=True)
        else:
            return unavailable(f"region {lost} was lost mid-stream ({why}) and a stream of n > 1 or several "
                               f"prompts cannot be resumed; send the request again")
        plan = router.policy.plan(*self.route_args, exclude=tuple(self.tried))
        deadline = time.monotonic() + router.settings.request_deadline_s
        outcome = await router.upstream.first(plan, "POST", self.path, content, deadline, stream=True)
        answer = outcome.answer
        if answer is None or answer.kind != "ok":
            if answer is not None:  # a 4xx: the continuation itself was refused
                return APIError(answer.status, f"region {answer.region.name} refused to continue the stream: "
                                                f"{answer.why or answer.body[:200].decode('utf-8', 'replace')}")
            tried = "; ".join(f"{a.region.name}: {a.why}" for a in outcome.refusals) or "no other region is up"
            return unavailable(f"region {lost} was lost mid-stream ({why}) and no region could continue it "
                               f"({tried})")
        self.tried.append(answer.region.name)
        for refusal in outcome.refusals:
            self.tried.append(refusal.region.name)
        router.metrics.failover(lost, kind)
        router.policy.served(answer.region, *self.route_args[1:])
        self.resumed = self.resumed or kind == "resume"
        return answer


async def _drain(answer: Answer, timeout_s: float = 0.5) -> None:
    """Read what follows [DONE] (the body's end) before letting go, so the connection goes back
    to the pool instead of being closed: across datacenters a new one costs a TLS handshake."""
    try:
        await asyncio.wait_for(answer.response.content.read(), timeout_s)
    except (*TRANSPORT_ERRORS, asyncio.TimeoutError):
        pass  # then it is closed: that costs a connection, nothing else
    finally:
        await answer.close()


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
