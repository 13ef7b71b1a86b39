"""What the engine hands back: vLLM's shapes (`RequestOutput.outputs[i].token_ids`,
`.text`, `.finish_reason`), plus the first completion's fields on the request output
itself for the common n = 1 case."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from moray.serve.engine.speculative import SpecStats


@dataclass
class CompletionOutput:
    index: int
    token_ids: List[int]
    text: str = ""
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" (OpenAI's names), None while running
    stop_reason: Optional[object] = None  # the stop string or token id that ended it, if any
    logprobs: Optional[List[float]] = None  # per generated token, when asked for
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served
    num_preemptions: int = 0

    @property
    def queue_time(self) -> Optional[float]:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> Optional[float]:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool = False
    metrics: Optional[RequestMetrics] = None
    prompt: Optional[str] = None

    # The first completion's fields, so `llm.generate(...)[0].text` reads as users expect.
    @property
    def token_ids(self) -> List[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> Optional[str]:
        return self.outputs[0].finish_reason


@dataclass
class EngineStats:
    """Counters the Serve layer exports (vLLM's metric names, see moray.serve)."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0  # tokens looked up
    prefix_cache_hits: int = 0  # tokens found
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    steps: int = 0
    spec_drafted: int = 0  # = spec.drafted
    spec_accepted: int = 0  # = spec.accepted
    # Speculative decoding: drafted, accepted, emitted, verification steps, acceptance_rate,
    # mean_accepted_length (all zero while it is off).
    spec: SpecStats = field(default_factory=SpecStats)
    time_to_first_token_s: List[float] = field(default_factory=list)
    inter_token_latency_s: List[float] = field(default_factory=list)
    e2e_latency_s: List[float] = field(default_factory=list)
    queue_time_s: List[float] = field(default_factory=list)
    # What MoE costs in serving: per step, tokens per expert (summed over layers) and the
    # distinct experts each layer touched.
    last_expert_tokens: Optional[List[int]] = None
    last_experts_touched: Optional[List[int]] = None
    # The executor's lost workers (a stage actor or node died): each rebuild's cause, cost in
    # seconds and the running requests it re-queued.
    executor_failures: int = 0
    recoveries: List[dict] = field(default_factory=list)
