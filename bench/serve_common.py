"""Pure-Python parts of bench/serve_engine.py that the vLLM worker shares (it runs in
another venv and imports neither torch from us nor moray): the prompts, the Poisson
workload, the two arrival drivers (continuous and static) and their statistics.

Both drivers replay the same arrivals in wall-clock time and observe each system
from outside, at the same points: after every engine step (or generate step) a
request's token count and the time are recorded, so time to first token (TTFT),
time per output token (TPOT) and throughput are measured alike for every system.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Sequence, Tuple


def make_prompts(n: int, length: int, vocab: int, seed: int) -> List[List[int]]:
    """n prompts of exactly `length` random token ids (ids 2.. so no special token)."""
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)]


@dataclass
class Arrival:
    index: int
    t: float  # seconds after the start
    prompt: List[int]
    max_tokens: int


def poisson_workload(n: int, rate: float, prompt_range: Tuple[int, int], output_range: Tuple[int, int],
                     vocab: int, seed: int) -> List[Arrival]:
    """n requests, exponential gaps at `rate` per second, prompt and output lengths uniform
    in the closed ranges (mixed lengths), all from one seed."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        plen = rng.randint(*prompt_range)
        out.append(Arrival(i, t, [rng.randrange(2, vocab) for _ in range(plen)], rng.randint(*output_range)))
    return out


class Recorder:
    """First and last token times and token counts per request, seen from outside."""

    def __init__(self, arrivals: Sequence[Arrival]):
        self.arrivals = arrivals
        self.first: Dict[int, float] = {}
        self.last: Dict[int, float] = {}
        self.count: Dict[int, int] = {}

    def saw(self, index: int, num_tokens: int, t: float) -> None:
        if num_tokens <= self.count.get(index, 0):
            return
        self.first.setdefault(index, t)
        self.last[index] = t
        self.count[index] = num_tokens

    def summary(self, elapsed: float) -> Dict[str, float]:
        ttft = [self.first[a.index] - a.t for a in self.arrivals if a.index in self.first]
        tpot = [(self.last[a.index] - self.first[a.index]) / (self.count[a.index] - 1)
                for a in self.arrivals if self.count.get(a.index, 0) > 1]
        e2e = [self.last[a.index] - a.t for a in self.arrivals if a.index in self.last]
        toks = sum(min(self.count.get(a.index, 0), a.max_tokens) for a in self.arrivals)
        done = sum(self.count.get(a.index, 0) >= a.max_tokens for a in self.arrivals)
        return {"requests": len(self.arrivals), "completed": done, "output_tokens": toks,
                "elapsed_s": elapsed, "tokens_per_s": toks / elapsed if elapsed > 0 else 0.0,
                "requests_per_s": done / elapsed if elapsed > 0 else 0.0,
                "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
                "tpot_p50_s": pct(tpot, 50), "tpot_p99_s": pct(tpot, 99),
                "e2e_p50_s": pct(e2e, 50), "e2e_p99_s": pct(e2e, 99)}


def pct(xs: Sequence[float], q: float) -> float:
    """Percentile by linear interpolation (numpy's default); nan when empty."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def drive_continuous(arrivals: Sequence[Arrival], add: Callable[[Arrival, float], None],
                     step: Callable[[], List[Tuple[int, int]]], busy: Callable[[], bool]) -> Dict[str, float]:
    """Continuous batching: each request is added the moment it arrives and the engine steps
    without pause; step() returns (request index, tokens so far) for requests that moved."""
    rec = Recorder(arrivals)
    t0 = time.monotonic()
    i = 0
    while i < len(arrivals) or busy():
        now = time.monotonic() - t0
        while i < len(arrivals) and arrivals[i].t <= now:
            add(arrivals[i], t0 + arrivals[i].t)
            i += 1
        if not busy():
            time.sleep(max(0.0, arrivals[i].t - (time.monotonic() - t0)))
            continue
        moved = step()
        t = time.monotonic() - t0
        for index, n in moved:
            rec.saw(index, n, t)
    return rec.summary(max(rec.last.values()) if rec.last else 0.0)


def drive_static(arrivals: Sequence[Arrival], run_batch: Callable[[List[Arrival], Callable], None],
                 max_batch: int) -> Dict[str, float]:
    """Static batching: when idle, take every request that has arrived (up to max_batch; if
    none, wait for the next) and run that batch to completion before looking again.
    run_batch(batch, saw) calls saw(index, tokens_so_far) after each of its steps; a request
    is credited with each token when its step ends (as if streamed), which flatters static
    batching: a plain static server answers only when the whole batch is done."""
    rec = Recorder(arrivals)
    t0 = time.monotonic()
    i = 0
    while i < len(arrivals):
        now = time.monotonic() - t0
        if arrivals[i].t > now:
            time.sleep(arrivals[i].t - now)
            now = time.monotonic() - t0
        batch = []
        while i < len(arrivals) and arrivals[i].t <= now and len(batch) < max_batch:
            batch.append(arrivals[i])
            i += 1
        run_batch(batch, lambda index, n: rec.saw(index, n, time.monotonic() - t0))
    return rec.summary(max(rec.last.values()) if rec.last else 0.0)
