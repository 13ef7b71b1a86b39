"""One request as the scheduler sees it: tokens known against tokens computed.

There are no prefill and decode modes (vLLM V1's idea). A request knows
`num_tokens` tokens (its prompt plus what it has generated) and has computed
the KV of the first `num_computed_tokens` of them. Each step the scheduler
gives it `num_tokens - num_computed_tokens` more (or a chunk of them): a
whole prompt, a prefill chunk, one decode token, or, after a preemption, the
prompt and its own earlier output again. The same arithmetic covers all four.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Optional


class RequestStatus(enum.IntEnum):
    """Ordered: everything above PREEMPTED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3  # a stop token or string, found by the engine
    FINISHED_LENGTH = 4  # sampling_params.max_tokens reached, found by the scheduler
    FINISHED_ABORTED = 5  # cancelled by the caller, or it can never fit (see Request.abort_reason)

    @staticmethod
    def is_finished(status: "RequestStatus | int") -> bool:
        return status > RequestStatus.PREEMPTED


# OpenAI's finish_reason for each finished status.
FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any  # .max_tokens and .n are all the scheduler reads
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    status: RequestStatus = RequestStatus.WAITING
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served at first admission
    num_preemptions: int = 0
    abort_reason: Optional[str] = None  # why the scheduler aborted it, for the engine to report
    # Hashes of the request's full blocks, extended lazily by the KV cache manager. Tokens
    # only ever get appended, so a hash stays valid across preemptions.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def finish_reason(self) -> Optional[str]:
        """"stop", "length", "abort", or None while it is not finished."""
        return FINISH_REASONS.get(self.status)

    def token_ids_slice(self, start: int, stop: int) -> list[int]:
        """all_token_ids[start:stop] without concatenating the whole history."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

    def append_output_token_ids(self, ids: "int | list[int]") -> None:
        if isinstance(ids, int):
            self.output_token_ids.append(ids)
        else:
            self.output_token_ids.extend(ids)
