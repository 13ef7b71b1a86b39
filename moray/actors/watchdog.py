"""A step-progress watchdog: a worker stuck in a collective never raises, so
something outside the stuck thread has to notice and end the process.

Ray Train then sees a dead worker, tears the group down and restarts it from
the last committed checkpoint.

Not every long wait is a hang. Start-up (building the model, loading a
checkpoint, the first step's warm-up) and waiting for a checkpoint to be
written are bounded by their own limits, so a slow save or a cold start never
kills healthy workers in a loop:

    dog = StepWatchdog(step_timeout_s=300, on_hang=...).start("startup", 1800)
    ... first step ...
    dog.beat(step)                      # back to the step limit
    with dog.phase("checkpoint", 1800):
        store.wait()
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Callable, Iterator, Optional

OnHang = Callable[[float, Optional[int], str], None]  # (stalled seconds, last step, phase)


class StepWatchdog:
    def __init__(self, step_timeout_s: float, on_hang: OnHang, exit: Callable[[int], None] = os._exit,
                 clock: Callable[[], float] = time.monotonic):
        self.step_timeout_s = step_timeout_s
        self.on_hang, self._exit, self._clock = on_hang, exit, clock
        self._lock = threading.Lock()
        self._last = clock()
        self._step: Optional[int] = None
        self._phase, self._timeout = "step", step_timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moray-watchdog", daemon=True)

    def start(self, phase: str = "step", timeout_s: Optional[float] = None) -> "StepWatchdog":
        self._enter(phase, timeout_s)
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """A step finished: the next one gets the step limit."""
        with self._lock:
            self._last, self._step = self._clock(), step
            self._phase, self._timeout = "step", self.step_timeout_s

    @contextlib.contextmanager
    def phase(self, name: str, timeout_s: float) -> Iterator[None]:
        """Bound the enclosed wait by `timeout_s` instead of the step limit; the clock restarts after it."""
        with self._lock:
            saved = self._phase, self._timeout
        self._enter(name, timeout_s)
        try:
            yield
        finally:
            with self._lock:
                self._phase, self._timeout = saved
                self._last = self._clock()

    def stop(self) -> None:
        self._stop.set()

    @property
    def current(self) -> tuple[str, float]:
        with self._lock:
            return self._phase, self._timeout

    def _enter(self, phase: str, timeout_s: Optional[float]) -> None:
        with self._lock:
            self._phase = phase
            self._timeout = self.step_timeout_s if timeout_s is None else timeout_s
            self._last = self._clock()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.step_timeout_s / 4)):
            with self._lock:
                stalled, timeout, phase, step = self._clock() - self._last, self._timeout, self._phase, self._step
            if stalled > timeout:
                try:
                    self.on_hang(stalled, step, phase)
                finally:
                    self._exit(124)  # the conventional "timed out" status
                return
