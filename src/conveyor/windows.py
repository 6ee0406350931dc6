"""Execution windows: a daily span of local time in which a task's jobs may start.

```python
@app.task(window="09:00-17:00 Europe/Oslo")      # office hours, DST-aware
@app.task(window="22:00-06:00")                  # across midnight, UTC
```

Pure module. The database applies the same rules in `<schema>.in_window` and
`<schema>.window_next_open` (migration 0005); `next_open` here mirrors them for
tests and for showing users when a job will run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from conveyor.errors import ConfigError

_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})(?:\s+(\S+))?\s*$")


@dataclass(frozen=True)
class ExecutionWindow:
    """Jobs start only while the local time in `tz` is within [start, end).

    `start > end` spans midnight (22:00-06:00). `start == end` is refused: it
    would be ambiguous between "always" and "never".
    """

    start: time
    end: time
    tz: str = "UTC"

    def __post_init__(self) -> None:
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ConfigError("window times must be naive local times (the zone is `tz`)")
        if self.start == self.end:
            raise ConfigError(f"window start and end are both {self.start}: give a real span")
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigError(f"window time zone {self.tz!r} is unknown") from exc

    @classmethod
    def parse(cls, text: str) -> ExecutionWindow:
        """Parse `"HH:MM-HH:MM [Zone/Name]"`; raises `ConfigError` naming the problem."""
        match = _WINDOW.match(text) if isinstance(text, str) else None
        if match is None:
            raise ConfigError(f"window {text!r} must look like '09:00-17:00 Europe/Oslo'")
        h1, m1, h2, m2, tz = match.groups()
        try:
            start, end = time(int(h1), int(m1)), time(int(h2), int(m2))
        except ValueError as exc:
            raise ConfigError(f"window {text!r}: {exc}") from exc
        return cls(start, end, tz or "UTC")

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} {self.tz}"

    def contains(self, at: datetime) -> bool:
        """Whether a job may start at `at` (timezone-aware)."""
        local = at.astimezone(ZoneInfo(self.tz)).time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def next_open(self, at: datetime) -> datetime:
        """`at` if the window is open then, else the first instant after it when it is.

        Mirrors `<schema>.window_next_open`: the earliest in-window candidate
        among the instants whose local time is `start` (both readings of a
        repeated hour, the shifted one of a skipped hour) and the UTC quarter
        hours ahead (a clock change can itself open the window).
        """
        if self.contains(at):
            return at
        zone = ZoneInfo(self.tz)
        local_day = at.astimezone(zone).date()
        candidates: list[datetime] = []
        for days in range(-1, 3):
            day = local_day + timedelta(days=days)
            for fold in (0, 1):
                local = datetime.combine(day, self.start, tzinfo=zone).replace(fold=fold)
                base = local.astimezone(UTC)
                candidates += [base + timedelta(hours=h) for h in (-1, 0, 1)]
        top = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        candidates += [top + timedelta(minutes=15 * q) for q in range(1, 201)]
        return min(c for c in candidates if c > at and self.contains(c))


def as_window(value: ExecutionWindow | str | None) -> ExecutionWindow | None:
    """Accept a window object, its text form, or None."""
    if value is None or isinstance(value, ExecutionWindow):
        return value
    return ExecutionWindow.parse(value)
