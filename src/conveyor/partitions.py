"""Per-task partitions of the jobs table: hot-task isolation (`app.partitions`).

`jobs` is partitioned by task. Every task's jobs land in the default partition
unless the task has a partition of its own; then PostgreSQL routes them there,
and the task's rows, indexes, dead tuples and vacuum stay apart from the rest.
A task that floods the queue, or keeps a long history, no longer bloats the
table every other task is claimed from, and its partition can be vacuumed or
inspected on its own.

```python
@app.task(partition=True)      # created when a worker of this app starts
async def ingest(ctx, event: dict) -> None: ...

await app.partitions.create("reports.render")   # or by hand, for any task name
await app.partitions.all()
await app.partitions.remove("reports.render")   # its jobs go back to the default
```

Creating or removing a partition moves the task's existing jobs, whatever
their state, in one transaction that holds `jobs` exclusively: claims,
enqueues, outcome writes and reads wait for it, none fails. Ids,
leases and fencing tokens move with the rows, so a job running during the
move finishes normally. Nothing else changes: counts, keys, runs and
notifications see no job come or go.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from conveyor.errors import InvalidArguments

if TYPE_CHECKING:
    from conveyor.app import App

TASK_NAME_MAX_LENGTH = 1_000


@dataclass(frozen=True, kw_only=True)
class PartitionInfo:
    """A task's own partition of the jobs table."""

    task: str
    """The task whose jobs it holds."""
    table_name: str
    """Its table, in the app's schema."""
    created_at: datetime
    """When it was created (database clock)."""
    estimated_rows: int
    """Rows as of the last ANALYZE or VACUUM (PostgreSQL's estimate, not a count)."""
    size_bytes: int
    """Disk used by the table and its indexes."""


class Partitions:
    """Create, list and remove per-task partitions: `app.partitions`."""

    def __init__(self, app: App) -> None:
        self._app = app

    async def all(self) -> list[PartitionInfo]:
        """Every task that has a partition of its own, by task name."""
        rows = await self._app.db.fetch("list partitions", "partition_list")
        return [PartitionInfo(**row) for row in rows]

    async def create(self, task: str) -> str:
        """Give `task` its own partition, moving its existing jobs into it; returns
        the partition's table name. Creating an existing partition changes nothing."""
        rows = await self._app.db.fetch(
            "create partition", "partition_create", {"task": _checked(task)}
        )
        return str(rows[0]["table_name"])

    async def remove(self, task: str) -> bool:
        """Move `task`'s jobs back to the default partition and drop its own.
        Returns False, changing nothing, if it had none."""
        rows = await self._app.db.fetch(
            "remove partition", "partition_remove", {"task": _checked(task)}
        )
        return bool(rows[0]["removed"])

    async def sync(self) -> list[str]:
        """Create the partitions that this app's tasks ask for (`partition=True`)
        and that do not exist yet; returns the tasks given one. Never removes."""
        wanted = sorted(name for name, task in self._app.tasks.items() if task.options.partition)
        if not wanted:
            return []
        existing = {p.task for p in await self.all()}
        created = [name for name in wanted if name not in existing]
        for name in created:
            await self.create(name)
        return created


def _checked(task: object) -> str:
    if not isinstance(task, str) or not task or "\x00" in task:
        raise InvalidArguments(f"a partition needs a non-empty task name, got {task!r}")
    if len(task) > TASK_NAME_MAX_LENGTH:
        raise InvalidArguments(
            f"task name longer than {TASK_NAME_MAX_LENGTH} characters: {task[:40]!r}..."
        )
    return task
