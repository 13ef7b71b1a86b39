"""A step-progress watchdog: a worker stuck in a collective never raises, so
something outside the stuck thread has to notice and end the process.

Ray Train then sees a dead worker, tears the group down and restarts it from
the last committed checkpoint.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable, Optional


class StepWatchdog:
    def __init__(self, timeout_s: float, on_hang: Callable[[float, Optional[int]], None]):
        self.timeout_s = timeout_s
        self.on_hang = on_hang
        self._last = time.monotonic()
        self._step: Optional[int] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moray-watchdog", daemon=True)

    def start(self) -> "StepWatchdog":
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self._last = time.monotonic()
        self._step = step

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        poll = min(1.0, self.timeout_s / 4)
        while not self._stop.wait(poll):
            stalled = time.monotonic() - self._last
            if stalled > self.timeout_s:
                try:
                    self.on_hang(stalled, self._step)
                finally:
                    os._exit(124)  # the conventional "timed out" status
