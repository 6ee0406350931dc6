"""Retention: delete finished jobs and pipeline runs older than a cutoff.

```python
await app.prune(older_than=timedelta(days=7))                       # every terminal state
await app.prune(older_than=timedelta(days=1), states=["succeeded"])  # keep failures longer
```

`conveyor prune --older-than 7d`, or let workers do it: `WorkerConfig(retention=
{"succeeded": timedelta(days=1), "failed": timedelta(days=30)})` prunes on each
rescuer pass. Deletes go in batches (`PRUNE_BATCH` rows per statement), each its
own transaction, skipping rows another transaction holds. Only terminal jobs
and runs are ever deleted; ages are measured from `finished_at` on the
database clock. Per-key and per-queue totals are kept (the count triggers
only take live jobs out of the live counts).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from conveyor.errors import InvalidArguments

if TYPE_CHECKING:
    from conveyor.db.database import Database

PRUNE_BATCH = 5_000
TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class PruneReport:
    """How many rows one prune deleted."""

    jobs: int = 0
    runs: int = 0


def check_retention(retention: Mapping[str, timedelta]) -> None:
    """Raise `InvalidArguments` unless every key is a terminal state and every age positive."""
    for state, age in retention.items():
        if state not in TERMINAL:
            raise InvalidArguments(f"retention applies to {TERMINAL}, not {state!r}")
        if not isinstance(age, timedelta) or age <= timedelta(0):
            raise InvalidArguments(
                f"retention of {state!r} must be a positive duration, got {age!r}"
            )


async def prune(
    db: Database,
    *,
    older_than: timedelta,
    states: Iterable[str] = TERMINAL,
    batch: int = PRUNE_BATCH,
) -> PruneReport:
    """Delete jobs and runs in `states` that finished more than `older_than` ago."""
    wanted = list(states)
    check_retention(dict.fromkeys(wanted, older_than))
    if batch <= 0:
        raise InvalidArguments(f"batch must be > 0, got {batch}")
    (row,) = await db.fetch("read clock", "clock_now_value")
    cutoff: datetime = row["now"] - older_than
    jobs = await _drain(db, "job_prune_batch", wanted, cutoff, batch)
    runs = await _drain(db, "run_prune_batch", wanted, cutoff, batch)
    return PruneReport(jobs=jobs, runs=runs)


async def _drain(db: Database, query: str, states: list[str], cutoff: datetime, batch: int) -> int:
    total = 0
    while True:
        (row,) = await db.fetch(
            "prune history", query, {"states": states, "cutoff": cutoff, "batch": batch}
        )
        total += int(row["n"])
        if int(row["n"]) < batch:
            return total
