"""Retry policies: how long to wait before attempt N+1 after attempt N failed.

A policy is any callable `(attempt: int) -> timedelta`; `ExponentialBackoff`
is the default. Pure module: no I/O.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol, runtime_checkable

from conveyor.errors import ConfigError


@runtime_checkable
class RetryPolicy(Protocol):
    """Returns the delay before the next attempt, given the attempt that just failed (1-based)."""

    def __call__(self, attempt: int) -> timedelta: ...


@dataclass(frozen=True, kw_only=True)
class ExponentialBackoff:
    """`base * factor ** (attempt - 1)`, capped at `max_delay`, with +/- `jitter` spread.

    Jitter spreads retries of jobs that failed together (a retry storm after an
    outage) so they do not all come back in the same instant.

    >>> ExponentialBackoff(base=timedelta(seconds=1), jitter=0)(3)
    datetime.timedelta(seconds=4)
    """

    base: timedelta = timedelta(seconds=1)
    """Delay after the first failed attempt."""
    factor: float = 2.0
    """Growth per attempt; 1.0 gives a constant delay."""
    max_delay: timedelta = timedelta(hours=1)
    """Upper bound of any single delay."""
    jitter: float = 0.1
    """Fraction of the delay added or removed at random (0 disables)."""
    _random: random.Random = field(default_factory=random.Random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.base < timedelta(0):
            raise ConfigError("ExponentialBackoff.base must not be negative")
        if self.factor < 1.0:
            raise ConfigError("ExponentialBackoff.factor must be >= 1.0")
        if self.max_delay < self.base:
            raise ConfigError("ExponentialBackoff.max_delay must be >= base")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigError("ExponentialBackoff.jitter must be within [0, 1]")

    def __call__(self, attempt: int) -> timedelta:
        """Delay after `attempt` (1-based) failed."""
        exponent = max(attempt - 1, 0)
        ceiling = self.max_delay.total_seconds()
        base = self.base.total_seconds()
        # Compare in log space: factor ** exponent overflows a float long before
        # the cap would apply (factor 1e6, attempt 60).
        if base == 0 or exponent * math.log(self.factor) >= math.log(ceiling / base):
            raw = ceiling if base else 0.0
        else:
            raw = base * self.factor**exponent
        spread = raw * self.jitter * (2 * self._random.random() - 1)
        # Jitter spreads retries but never past the documented bound.
        return timedelta(seconds=min(max(raw + spread, 0.0), ceiling))


@dataclass(frozen=True)
class FixedDelay:
    """The same delay after every failed attempt."""

    delay: timedelta

    def __call__(self, attempt: int) -> timedelta:
        """Return the fixed delay whatever the attempt."""
        return self.delay


DEFAULT_RETRY = ExponentialBackoff()
