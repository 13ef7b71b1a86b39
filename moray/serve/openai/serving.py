"""OpenAI requests -> engine requests, and engine outputs -> OpenAI responses.

    job = prepare_completion(request, tokenizer, limits)     # or prepare_chat: 400s raised here
    async for prompt_index, out in generate(engine, job): ...
    Formatter(job, tokenizer, model_name).chunks(prompt_index, out)   # SSE lines of what is new
    Formatter(...).response(outputs)                                  # the whole answer

Everything a request can get wrong is checked in `prepare_*`, before the engine sees
it and before a stream starts, so a bad request is always a 4xx with a status line,
never an error event in a stream that already said 200.

Text is decoded here from the token ids (special tokens skipped, so a chat reply never
shows `<|end|>`), and cut at a stop string the way the engine cut the tokens. A stream
holds back what may still change: a trailing partial UTF-8 character, and the last
len(longest stop) - 1 characters, which could turn out to be the start of a stop
string; so the chunks of a stream always add up to the text a non-streamed request gets.

Token ids (`return_token_ids`, vLLM's): a stream holds back the ids of the text it holds
back, so after every chunk the ids sent decode to exactly the text sent, never half a
character; a router that loses the region mid-stream resumes from those ids.
`continue_token_ids` (moray's) is that resumption: the engine starts from prompt + those
ids with what is left of max_tokens (resolved as for the original request), and the
text, the stop-string cut and usage are computed over the whole output, so the answer
goes on exactly where the first one stopped, whatever the tokenizer does at the seam;
a chat continues the same turn (no second role chunk). A greedy continuation is the
undisturbed sequence; a sampled one is a valid draw but not the same one (its generator
starts afresh, and penalties see the continued ids as prompt).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import AsyncIterator, Dict, List, Optional, Sequence, Tuple, Union

from moray.serve.engine.outputs import CompletionOutput, RequestOutput
from moray.serve.engine.sampling import SamplingParams
from moray.serve.openai import protocol as p
from moray.serve.openai.chat import chat_prompt_ids, chat_stop_ids
from moray.serve.openai.errors import APIError, bad_request

DONE = "data: [DONE]\n\n"


@dataclass
class Limits:
    max_model_len: int
    vocab_size: int
    max_tokens_default: int
    max_tokens_limit: Optional[int] = None
    max_n: int = 16


@dataclass
class Job:
    """One OpenAI request, ready for the engine: one engine request per prompt."""

    kind: str  # "completion" or "chat"
    id: str
    prompts: List[List[int]]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: Optional[int] = None  # top logprobs per token; None = off
    return_token_ids: bool = False
    continued: Optional[List[int]] = None  # continue_token_ids: output made before this request (in prompts[0])

    @property
    def num_sequences(self) -> int:
        return len(self.prompts) * self.params.n


def context_error(what: str, param: str) -> APIError:
    return APIError(400, what, param=param, code="context_length_exceeded")


def _prompt_ids(prompt: Union[str, List[int]], tokenizer, limits: Limits, where: str) -> List[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise bad_request("this model has no tokenizer: send the prompt as a list of token ids", where)
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{limits.vocab_size - 1})", where)
    if not ids:
        raise bad_request("the prompt is empty; give at least one token", where)
    return ids


def _max_tokens(requested: Optional[int], prompts: Sequence[List[int]], limits: Limits, param: str) -> int:
    longest = max(len(ids) for ids in prompts)
    room = limits.max_model_len - longest
    if room < 1:
        raise context_error(f"the prompt is {longest} tokens, and this model's context is {limits.max_model_len} "
                            f"tokens with at least one to generate; shorten the prompt", param)
    if requested is None:
        return min(limits.max_tokens_default, room, limits.max_tokens_limit or room)
    if limits.max_tokens_limit is not None and requested > limits.max_tokens_limit:
        raise bad_request(f"max_tokens is {requested}; this server allows at most {limits.max_tokens_limit}",
                          "max_tokens")
    if requested > room:
        raise context_error(f"prompt ({longest} tokens) + max_tokens ({requested}) is more than this model's context "
                            f"of {limits.max_model_len} tokens; lower max_tokens to at most {room} or shorten the "
                            f"prompt", "max_tokens")
    return requested


def _params(req, max_tokens: int, logprobs: Optional[int], extra_stop_ids: Sequence[int] = ()) -> SamplingParams:
    stop_ids = list(req.stop_token_ids or []) + [i for i in extra_stop_ids if i not in (req.stop_token_ids or [])]
    try:
        return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                              min_p=req.min_p, seed=req.seed, stop=req.stop, stop_token_ids=stop_ids or None,
                              max_tokens=max_tokens, logprobs=logprobs, presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                              ignore_eos=req.ignore_eos)
    except ValueError as err:  # names the field
        raise bad_request(str(err), str(err).split(" ", 1)[0]) from None


def _continuation(req, prompts: List[List[int]], max_tokens: int, limits: Limits):
    """(continued ids, engine prompts, max_tokens left): the engine starts from prompt + the
    continued ids with what is left of the max_tokens the original request resolved to."""
    ids = req.continue_token_ids
    if ids is None:
        return None, prompts, max_tokens
    if len(prompts) != 1 or req.n != 1:
        raise bad_request("continue_token_ids continues one sequence: send one prompt with n = 1",
                          "continue_token_ids")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{limits.vocab_size - 1})",
                          "continue_token_ids")
    if len(ids) >= max_tokens:
        raise bad_request(f"continue_token_ids has {len(ids)} tokens, and max_tokens is {max_tokens}: nothing is "
                          f"left to generate", "continue_token_ids")
    return list(ids), [prompts[0] + list(ids)], max_tokens - len(ids)


def _check_n(n: int, num_prompts: int, limits: Limits) -> None:
    if n * num_prompts > limits.max_n:
        extra = f" x {num_prompts} prompts" if num_prompts > 1 else ""
        raise bad_request(f"n is {n}{extra}; this server gives at most {limits.max_n} choices per request", "n")


def prepare_completion(req: p.CompletionRequest, tokenizer, limits: Limits) -> Job:
    prompts = [_prompt_ids(x, tokenizer, limits, "prompt") for x in req.prompts]
    _check_n(req.n, len(prompts), limits)
    max_tokens = _max_tokens(req.max_tokens, prompts, limits, "prompt" if req.max_tokens is None else "max_tokens")
    continued, prompts, max_tokens = _continuation(req, prompts, max_tokens, limits)
    return Job("completion", p.new_id("cmpl"), prompts, _params(req, max_tokens, req.logprobs), req.stream,
               req.include_usage, req.logprobs, req.return_token_ids, continued)


def prepare_chat(req: p.ChatCompletionRequest, tokenizer, limits: Limits) -> Job:
    ids = chat_prompt_ids(tokenizer, req.messages)
    _check_n(req.n, 1, limits)
    requested = req.max_new_tokens
    max_tokens = _max_tokens(requested, [ids], limits, "messages" if requested is None else "max_tokens")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    continued, prompts, max_tokens = _continuation(req, [ids], max_tokens, limits)
    return Job("chat", p.new_id("chatcmpl"), prompts, _params(req, max_tokens, logprobs, chat_stop_ids(tokenizer)),
               req.stream, req.include_usage, logprobs, req.return_token_ids, continued)


# ---------------------------------------------------------------- running


async def generate(engine, job: Job) -> AsyncIterator[Tuple[int, RequestOutput]]:
    """(prompt index, RequestOutput) as the engine makes progress on each prompt; closing this
    generator closes the engine's streams, which abort their requests (KV blocks freed)."""
    if len(job.prompts) == 1:
        async for out in engine.generate(job.id, job.prompts[0], job.params):
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, ids: List[int]) -> None:
        try:
            async for out in engine.generate(f"{job.id}-{i}", ids, job.params):
                queue.put_nowait((i, out))
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((i, err))
        finally:
            queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i, ids)) for i, ids in enumerate(job.prompts)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------- formatting


def _stops(params: SamplingParams) -> List[str]:
    return [s for s in (params.stop or []) if s]


@dataclass
class _Choice:
    """What one choice of a stream has sent so far."""

    text: int = 0  # characters
    tokens: int = 0  # tokens whose logprobs were sent
    started: bool = False  # chat: the role delta went out


@dataclass
class Formatter:
    job: Job
    tokenizer: object
    model: str
    _sent: Dict[int, _Choice] = field(default_factory=dict)

    def __post_init__(self):
        self._before = list(self.job.continued or [])  # output ids made before this request
        # the characters of text they stand for, which the client already has
        self._base = len(self._decode([])) if self._before and self.tokenizer is not None else 0

    # -------- text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(self._before + list(ids), skip_special=True)

    def text(self, comp: CompletionOutput) -> str:
        """The whole output's text (continued ids included), cut at a stop string."""
        if self.tokenizer is None:
            return ""
        text = self._decode(comp.token_ids)
        if comp.finish_reason == "stop" and isinstance(comp.stop_reason, str):
            at = text.find(comp.stop_reason, self._base)  # the engine found it in its own output
            if at >= 0:
                text = text[:at]
        return text

    def _stable(self, comp: CompletionOutput) -> str:
        text = self.text(comp)
        if comp.finished:
            return text
        # A multi-byte character not complete yet first, then what could start a stop string: the
        # hold counts from the last whole character (the one to come may complete a stop string).
        text = text.rstrip("\ufffd")
        hold = max((len(s) for s in _stops(self.job.params)), default=1) - 1
        return text[:-hold] if hold else text

    def _aligned(self, comp: CompletionOutput, sent_tokens: int) -> Tuple[int, str]:
        """(k, text): the most tokens whose whole text may go out now, and that text. What
        `_stable` holds back holds back its tokens too, so the ids a client has always decode
        to the text it has (a router resumes a cut stream from them)."""
        if comp.finished or self.tokenizer is None:
            return len(comp.token_ids), self.text(comp)
        stable = len(self._stable(comp))
        for k in range(len(comp.token_ids), sent_tokens, -1):
            text = self._decode(comp.token_ids[:k])
            if len(text) <= stable and not text.endswith("\ufffd"):
                return k, text
        return sent_tokens, ""

    def _token(self, token_id: int) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode([token_id])

    # -------- logprobs

    def _completion_logprobs(self, comp: CompletionOutput, start: int, end: int) -> Optional[p.CompletionLogprobs]:
        if self.job.logprobs is None or comp.logprobs is None:
            return None
        tokens = [self._token(t) for t in comp.token_ids[start:end]]
        offsets, at = [], self._base
        for tok in [self._token(t) for t in comp.token_ids[:start]]:
            at += len(tok)
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        tops = None
        if self.job.logprobs and comp.top_logprobs is not None:
            tops = [{self._token(t): lp for t, lp in row} for row in comp.top_logprobs[start:end]]
        return p.CompletionLogprobs(tokens=tokens, token_logprobs=list(comp.logprobs[start:end]), top_logprobs=tops,
                                    text_offset=offsets)

    def _entry(self, token_id: int, logprob: float) -> dict:
        tok = self._token(token_id)
        raw = [token_id] if getattr(self.tokenizer, "id", "") == "byte-v1" and token_id < 256 else list(tok.encode())
        return {"token": tok, "logprob": logprob, "bytes": raw}

    def _chat_logprobs(self, comp: CompletionOutput, start: int, end: int) -> Optional[p.ChatLogprobs]:
        if self.job.logprobs is None or comp.logprobs is None:
            return None
        content = []
        for k in range(start, end):
            tops = comp.top_logprobs[k] if self.job.logprobs and comp.top_logprobs is not None else []
            content.append(p.TokenLogprob(**self._entry(comp.token_ids[k], comp.logprobs[k]),
                                          top_logprobs=[p.TopLogprob(**self._entry(t, lp)) for t, lp in tops]))
        return p.ChatLogprobs(content=content)

    # -------- whole responses

    def usage(self, outputs: Sequence[RequestOutput]) -> p.UsageInfo:
        before = len(self._before)  # continued ids: output, though the engine took them as prompt
        prompt = sum(len(o.prompt_token_ids) for o in outputs) - before
        completion = sum(len(c.token_ids) for o in outputs for c in o.outputs) + before
        return p.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _prompt_ids(self, prompt_index: int) -> Optional[List[int]]:
        """return_token_ids: the prompt's ids as the client sent them (without continued ids)."""
        if not self.job.return_token_ids:
            return None
        ids = self.job.prompts[prompt_index]
        return ids[:len(ids) - len(self._before)]

    def _ids(self, comp: CompletionOutput, start: int, end: int) -> Optional[List[int]]:
        return list(comp.token_ids[start:end]) if self.job.return_token_ids else None

    def response(self, outputs: Sequence[RequestOutput]) -> str:
        """The JSON body of a non-streamed answer; outputs[i] is prompt i's final RequestOutput."""
        n = self.job.params.n
        if self.job.kind == "completion":
            choices = [p.CompletionChoice(index=i * n + c.index, text=self.text(c)[self._base:],
                                          finish_reason=c.finish_reason,
                                          logprobs=self._completion_logprobs(c, 0, len(c.token_ids)),
                                          prompt_token_ids=self._prompt_ids(i),
                                          token_ids=self._ids(c, 0, len(c.token_ids)))
                       for i, o in enumerate(outputs) for c in o.outputs]
            body = p.CompletionResponse(id=self.job.id, model=self.model, choices=choices, usage=self.usage(outputs))
        else:
            choices = [p.ChatChoice(index=c.index, message=p.ChatResponseMessage(content=self.text(c)[self._base:]),
                                    finish_reason=c.finish_reason,
                                    logprobs=self._chat_logprobs(c, 0, len(c.token_ids)),
                                    token_ids=self._ids(c, 0, len(c.token_ids)))
                       for c in outputs[0].outputs]
            body = p.ChatCompletionResponse(id=self.job.id, model=self.model, choices=choices,
                                            usage=self.usage(outputs), prompt_token_ids=self._prompt_ids(0))
        return body.model_dump_json()

    # -------- streams

    def _choice_state(self, index: int) -> _Choice:
        # A continued sequence: its text so far and (chat) its role went out before this request.
        return self._sent.setdefault(index, _Choice(text=self._base, started=self.job.continued is not None))

    def first_chunks(self) -> List[str]:
        """Chat streams start with each choice's role, as OpenAI's do (a continued one has it)."""
        if self.job.kind != "chat" or self.job.continued is not None:
            return []
        out = []
        for c in range(self.job.params.n):
            self._choice_state(c).started = True
            out.append(self._chat_chunk(c, p.DeltaMessage(role="assistant", content=""),
                                        prompt_token_ids=self._prompt_ids(0) if c == 0 else None))
        return out

    def chunks(self, prompt_index: int, out: RequestOutput) -> List[str]:
        """SSE events for what is new in `out` since the last call."""
        events = []
        ids_wanted = self.job.return_token_ids
        for comp in out.outputs:
            index = prompt_index * self.job.params.n + comp.index
            sent = self._choice_state(index)
            if ids_wanted:
                end, stable = self._aligned(comp, sent.tokens)
            else:
                end, stable = len(comp.token_ids), self._stable(comp)
            delta = stable[sent.text:] if len(stable) > sent.text else ""
            start = sent.tokens
            per_token = self.job.logprobs is not None or ids_wanted
            if not delta and comp.finish_reason is None and not (per_token and end > start):
                continue
            sent.text, sent.tokens = max(sent.text, len(stable)), end
            if self.job.kind == "completion":
                first = not sent.started  # vLLM: a choice's first chunk carries its prompt's ids
                sent.started = True
                choice = p.CompletionChoice(index=index, text=delta, finish_reason=comp.finish_reason,
                                            logprobs=self._completion_logprobs(comp, start, end),
                                            prompt_token_ids=self._prompt_ids(prompt_index) if first else None,
                                            token_ids=self._ids(comp, start, end))
                events.append(_sse(p.CompletionResponse(id=self.job.id, model=self.model, choices=[choice])))
            else:
                events.append(self._chat_chunk(index, p.DeltaMessage(content=delta),
                                               self._chat_logprobs(comp, start, end), comp.finish_reason,
                                               self._ids(comp, start, end)))
        return events

    def usage_chunk(self, outputs: Sequence[RequestOutput]) -> str:
        usage = self.usage(outputs)
        if self.job.kind == "completion":
            return _sse(p.CompletionResponse(id=self.job.id, model=self.model, choices=[], usage=usage))
        return _sse(p.ChatCompletionChunk(id=self.job.id, model=self.model, choices=[], usage=usage))

    def _chat_chunk(self, index: int, delta: p.DeltaMessage, logprobs=None, finish_reason=None, token_ids=None,
                    prompt_token_ids=None) -> str:
        choice = p.ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                                    token_ids=token_ids)
        return _sse(p.ChatCompletionChunk(id=self.job.id, model=self.model, choices=[choice],
                                          prompt_token_ids=prompt_token_ids))


def _sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def error_event(err: APIError) -> str:
    """An error after the stream began (the engine stopped): OpenAI's object as an event."""
    return f"data: {json.dumps(err.body())}\n\n"
