"""Exceptions a task raises to steer its own outcome (as in River and arq).

- `Retry(delay)`: this attempt failed; try again after `delay` (or the task's
  retry policy when `delay` is None). Counts as an attempt.
- `Snooze(delay)`: not a failure; run again after `delay` without using an attempt.
- `Cancel(reason)`: stop for good; the job ends `cancelled`.
- `Fail(reason)`: fail for good, whatever attempts are left; the job ends `failed`.
"""

from __future__ import annotations

from datetime import timedelta


class JobOutcome(Exception):
    """Base of the outcome signals; never raised by conveyor itself."""


class Retry(JobOutcome):
    """Fail this attempt and retry after `delay` (default: the task's retry policy)."""

    def __init__(self, delay: timedelta | float | None = None, reason: str = "retry requested"):
        super().__init__(reason)
        self.delay = _as_timedelta(delay)
        self.reason = reason


class Snooze(JobOutcome):
    """Run the job again after `delay` without counting an attempt."""

    def __init__(self, delay: timedelta | float):
        seconds = _as_timedelta(delay)
        assert seconds is not None
        super().__init__(f"snoozed for {seconds}")
        self.delay = seconds


class Cancel(JobOutcome):
    """End the job as `cancelled` with `reason`; it is not retried."""

    def __init__(self, reason: str = "cancelled by task"):
        super().__init__(reason)
        self.reason = reason


class Fail(JobOutcome):
    """End the job as `failed` now, without using its remaining attempts."""

    def __init__(self, reason: str = "failed by task"):
        super().__init__(reason)
        self.reason = reason


def _as_timedelta(value: timedelta | float | None) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        return value
    return timedelta(seconds=value)
