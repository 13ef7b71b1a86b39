"""Errors that retrying cannot fix.

Ray Train restarts the worker group after any worker error, up to
`train.max_failures` times. A bad config, a missing `--resume` target or a
model that does not match its `init_from` weights fails the same way on every
attempt, so a worker raises `NonRetryableError` for them, and the failure
callback in Ray Train's controller (moray.platform.failures) stops the run at
once instead of burning the retries.
"""

from __future__ import annotations

MARKER = "NonRetryableError"  # what the callback looks for in a worker's error text


class NonRetryableError(RuntimeError):
    """Raised by a worker for a failure that would repeat on every attempt."""
