"""What the router knows about one region: its breaker, latency, load and errors, and why
it is in the state it is in (the rows of GET /regions).

Everything here is touched only from the router's event loop, so there are no locks.

    latency_ms   EWMA of the round trip of the region's /health (probes): how far it is
    queue_depth  moray:num_requests_waiting from its /metrics, summed over its replicas
    kv_usage     moray:kv_cache_usage_perc, averaged over them
    in_flight    requests this router has open there now (seen at once, unlike a probe)
    load         (in_flight + queue_depth) / weight: what "least loaded" compares
    saturated    queue_depth >= router.queue_threshold, kv_usage >= router.kv_threshold,
                 or a 429 from it within its Retry-After
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

from moray.serve.router.breaker import BreakerState, CircuitBreaker

log = logging.getLogger("moray.router")
WAITING, KV_USAGE = "moray:num_requests_waiting", "moray:kv_cache_usage_perc"


def parse_gauges(text: str) -> dict:
    """The two gauges the router reads from a region's Prometheus text: waiting sequences summed
    over the replicas (one sample each), KV-cache use averaged over them (the region's fill). A
    plain scan: the body is small and the names are fixed."""
    samples = {WAITING: [], KV_USAGE: []}
    for line in text.splitlines():
        if line.startswith(WAITING) or line.startswith(KV_USAGE):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in samples:
                try:
                    samples[name].append(float(line.rsplit(" ", 1)[1]))
                except ValueError:
                    continue
    kv = samples[KV_USAGE]
    return {WAITING: sum(samples[WAITING]), KV_USAGE: sum(kv) / len(kv) if kv else 0.0}


class RegionState:
    def __init__(self, spec, settings, upstream_key: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.spec, self.settings, self.clock = spec, settings, clock
        self.name, self.url, self.location, self.weight = spec.name, spec.url, spec.location, spec.weight
        self.breaker = CircuitBreaker(settings.breaker, clock)
        self.headers = {"content-type": "application/json"}
        if upstream_key:
            self.headers["authorization"] = f"Bearer {upstream_key}"
        self.latency_s: Optional[float] = None
        self.queue_depth = 0.0
        self.kv_usage = 0.0
        self.in_flight = 0
        self.requests = 0
        self.errors = 0
        self.last_error = ""
        self.last_probe_at: Optional[float] = None
        self.saturated_until = 0.0
        self.saturated_why = ""

    def __repr__(self) -> str:  # never the headers (the upstream key)
        return f"RegionState({self.name}, {self.breaker.state.label})"

    # ---------------------------------------------------------------- what happened

    def observe_latency(self, seconds: float) -> None:
        a = self.settings.latency_alpha
        self.latency_s = seconds if self.latency_s is None else a * seconds + (1 - a) * self.latency_s

    def observe_load(self, gauges: dict) -> None:
        self.queue_depth = gauges.get(WAITING, 0.0)
        self.kv_usage = gauges.get(KV_USAGE, 0.0)

    def success(self) -> None:
        before = self.breaker.state
        self.breaker.record_success()
        self._log_change(before)

    def failure(self, why: str) -> None:
        self.errors += 1
        self.last_error = why
        before = self.breaker.state
        self.breaker.record_failure(why)
        self._log_change(before)

    def _log_change(self, before: BreakerState) -> None:
        if self.breaker.state is not before:
            log.warning("region %s: breaker %s -> %s: %s", self.name, before.label, self.breaker.state.label,
                        self.breaker.why)

    def refused(self, retry_after_s: Optional[float]) -> None:
        """A 429: full for now. Not a failure (the region works), but skip it while it says so."""
        hold = retry_after_s if retry_after_s is not None else self.settings.saturated_hold_s
        self.saturated_until = max(self.saturated_until, self.clock() + hold)
        self.saturated_why = f"answered 429 (queue full); skipped for {hold:g} s"

    # ---------------------------------------------------------------- what it is now

    @property
    def load(self) -> float:
        return (self.in_flight + self.queue_depth) / self.weight

    @property
    def near(self) -> bool:
        """Within the latency budget (a region never probed yet counts as near)."""
        return self.latency_s is None or self.latency_s * 1e3 <= self.settings.latency_budget_ms

    def saturated(self) -> Optional[str]:
        """Why the region is too busy to take more, or None."""
        s = self.settings
        if self.clock() < self.saturated_until:
            return self.saturated_why
        if self.queue_depth >= s.queue_threshold > 0:
            return f"{self.queue_depth:g} sequences waiting (router.queue_threshold {s.queue_threshold:g})"
        if self.kv_usage >= s.kv_threshold:
            return f"KV cache {100 * self.kv_usage:.0f}% full (router.kv_threshold {100 * s.kv_threshold:.0f}%)"
        return None

    def row(self) -> dict:
        """This region's line in GET /regions: its state and why."""
        state = self.breaker.state
        busy = self.saturated()
        if state is BreakerState.OPEN:
            status, why = "down", f"{self.breaker.why}; a trial in {self.breaker.seconds_to_trial():.1f} s"
        elif state is BreakerState.HALF_OPEN:
            status, why = "recovering", self.breaker.why
        elif busy:
            status, why = "saturated", busy
        else:
            status, why = "up", ("healthy" if not self.last_error else f"healthy (last error: {self.last_error})")
        age = None if self.last_probe_at is None else round(self.clock() - self.last_probe_at, 3)
        return {"name": self.name, "url": self.url, "location": self.location, "weight": self.weight,
                "status": status, "why": why, "breaker": state.label,
                "failures_in_a_row": self.breaker.failures_in_a_row,
                "latency_ms": None if self.latency_s is None else round(1e3 * self.latency_s, 3),
                "near": self.near, "queue_depth": self.queue_depth, "kv_usage": self.kv_usage,
                "in_flight": self.in_flight, "load": round(self.load, 3), "requests": self.requests,
                "errors": self.errors, "last_error": self.last_error or None, "last_probe_age_s": age}
