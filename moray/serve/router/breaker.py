"""A circuit breaker per region: closed -> open after N failures in a row -> half-open after a
cool-down -> closed after M successes (or open again on one failure).

    b = CircuitBreaker(BreakerSettings(failures=3, cool_down_s=10, successes=2))
    if b.acquire(): ... send ...; b.release(); b.record_success() / b.record_failure("why")

Probes and requests both report: a region that stops answering its /health opens before a
client ever waits on it, and one whose requests fail opens even when /health still answers.
While half-open, `trials` requests at a time are let through (a probe needs no slot), so a
region that is still broken costs one request a retry, not a burst. A success reported while
open (a request that began before the breaker opened) is not evidence enough to close it.

The clock is injected, so the state machine is tested without sleeping.
"""

from __future__ import annotations

import time
from enum import IntEnum
from typing import Callable


class BreakerState(IntEnum):
    CLOSED = 0  # traffic flows; failures in a row are counted
    HALF_OPEN = 1  # after the cool-down: a few trials decide
    OPEN = 2  # no traffic until the cool-down ends

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


class CircuitBreaker:
    def __init__(self, settings, clock: Callable[[], float] = time.monotonic):
        self.settings, self.clock = settings, clock
        self._state = BreakerState.CLOSED
        self.failures_in_a_row = 0
        self.successes = 0  # in half-open
        self.trials = 0  # half-open requests in flight
        self.opened_at = 0.0
        self.why = "no failures"

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self.clock() - self.opened_at >= self.settings.cool_down_s:
            self._state, self.successes, self.trials = BreakerState.HALF_OPEN, 0, 0
            self.why = f"cool-down of {self.settings.cool_down_s:g} s over: trying again"
        return self._state

    def allows(self) -> bool:
        """Whether a request may go now (without taking a half-open trial slot)."""
        state = self.state
        return state is BreakerState.CLOSED or (state is BreakerState.HALF_OPEN
                                                and self.trials < self.settings.trials)

    def acquire(self) -> bool:
        """Take the right to send one request; pair with release() when it is answered."""
        if not self.allows():
            return False
        if self._state is BreakerState.HALF_OPEN:
            self.trials += 1
        return True

    def release(self) -> None:
        if self._state is BreakerState.HALF_OPEN and self.trials > 0:
            self.trials -= 1

    def record_success(self) -> None:
        state = self.state
        if state is BreakerState.CLOSED:
            self.failures_in_a_row = 0
        elif state is BreakerState.HALF_OPEN:
            self.successes += 1
            if self.successes >= self.settings.successes:
                self._state, self.failures_in_a_row = BreakerState.CLOSED, 0
                self.why = f"closed again after {self.successes} successes in half-open"

    def record_failure(self, why: str) -> None:
        state = self.state
        self.failures_in_a_row += 1
        if state is BreakerState.HALF_OPEN:
            self._open(f"a trial failed in half-open ({why})")
        elif state is BreakerState.CLOSED and self.failures_in_a_row >= self.settings.failures:
            self._open(f"{self.failures_in_a_row} failures in a row, the last: {why}")

    def _open(self, why: str) -> None:
        self._state, self.opened_at, self.trials, self.successes = BreakerState.OPEN, self.clock(), 0, 0
        self.why = why

    def seconds_to_trial(self) -> float:
        """How long until an open breaker lets a trial through (0 when it is not open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.settings.cool_down_s - self.clock())
