"""OpenAI's request and response bodies, as pydantic models.

Requests are strict (a string where a number belongs is a 400 naming the field, as
OpenAI answers, not a silent cast) and ignore keys they do not know, as vLLM does, so
clients that send `user`, `metadata` or `store` keep working. Fields OpenAI has but
moray does not implement are declared so that a value other than their no-op default
is refused by name instead of ignored (`echo`, `suffix`, `logit_bias`, `tools`, ...).

Token ids (for the multi-region router, moray/serve/router/, and any client that resumes):
`return_token_ids` is vLLM's extension and answers in vLLM's shape (`prompt_token_ids`
on a completion choice, at the top of a chat answer, on a stream's first chunk; per
choice `token_ids`, the generated ids including a stop token); the fields are left out
of a body unless asked for. `continue_token_ids` is moray's: ids this request already
generated somewhere (a stream cut by a lost region); the answer goes on after them as
if it had made them itself (moray/serve/openai/serving.py says how).

Bounds that depend on the deployment (n, max_tokens, the context) are checked by the
server against the serve config (moray/serve/openai/serving.py); the bounds here are
OpenAI's own.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and the engine's (sampling.MAX_LOGPROBS)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False  # one last chunk with the usage and no choices


class _SamplingFields(_Request):
    """What both endpoints share: OpenAI's sampling fields plus vLLM's extensions."""

    model: str
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[int] = None
    stop: Union[None, str, List[str]] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted, unused
    logit_bias: Optional[Dict[str, float]] = None  # not implemented: only empty
    # vLLM's extensions (extra_body in the openai client)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    return_token_ids: bool = False
    continue_token_ids: Optional[List[int]] = None  # moray's: resume a sequence (n = 1, one prompt)

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v):
        if v:
            raise ValueError("not supported by this server; leave it out")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences (OpenAI's limit)")
        if any(not s for s in items):
            raise ValueError("an empty string cannot end a completion; leave it out")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    # A string, a list of token ids, or a batch of either (one choice group per prompt).
    prompt: Union[str, List[int], List[str], List[List[int]]]
    max_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # not implemented
    suffix: Optional[str] = None  # not implemented
    best_of: Optional[int] = Field(None, ge=1)  # only best_of == n

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("not supported by this server; leave it out or set it to false")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("insertion is not supported by this server; leave it out")
        return v

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("an empty list: give a string, token ids, or a list of them")
        return v

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        return self

    @property
    def prompts(self) -> List[Union[str, List[int]]]:
        """The batch: one entry per prompt."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer"]
    # A string, or OpenAI's content parts of which only {"type": "text"} is served here.
    content: Union[str, List[Dict[str, Any]], None] = None
    name: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[List[Dict[str, Any]]] = None  # not implemented: only empty
    tool_choice: Union[None, str, Dict[str, Any]] = None
    response_format: Optional[Dict[str, Any]] = None  # only {"type": "text"}

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("function calling is not supported by this server; leave tools out")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v):
        if v not in (None, "none", "auto"):
            raise ValueError("this server calls no tools; leave tool_choice out")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v and v.get("type") != "text":
            raise ValueError("only {'type': 'text'} is supported by this server")
        return v

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(BaseModel):
    """The legacy completions API's logprobs object."""

    tokens: List[str] = Field(default_factory=list)
    token_logprobs: List[float] = Field(default_factory=list)
    top_logprobs: Optional[List[Dict[str, float]]] = None
    text_offset: List[int] = Field(default_factory=list)


def _ids() -> Any:
    """An optional list of token ids that is left out of the JSON unless set (return_token_ids)."""
    return Field(None, exclude_if=lambda v: v is None)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    prompt_token_ids: Optional[List[int]] = _ids()
    token_ids: Optional[List[int]] = _ids()


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[CompletionChoice]
    usage: Optional[UsageInfo] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: List[TokenLogprob] = Field(default_factory=list)


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = ""


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    token_ids: Optional[List[int]] = _ids()


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[ChatChoice]
    usage: Optional[UsageInfo] = None
    prompt_token_ids: Optional[List[int]] = _ids()


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    token_ids: Optional[List[int]] = _ids()


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[ChatStreamChoice]
    usage: Optional[UsageInfo] = None
    prompt_token_ids: Optional[List[int]] = _ids()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "moray"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error object: every 4xx and 5xx this server sends has this body."""

    error: ErrorInfo
