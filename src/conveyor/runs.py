r"""Pipeline runs: their records and the operations on them (`app.runs`).

```
 start (key busy)          start
      |                      |
      v      key free        v         every step succeeded
 [waiting] ------------> [running] ------------------------> [succeeded]
      |                   |     |
      | cancel     cancel |     | a step failed for good (after its retries)
      |         (or a step|     |
      |     was cancelled)|     |
      v                   v     v
 [cancelled] <-------------    [failed]
      |                           |
      +------- retry -------------+---> [running] or [waiting]
```

A run's steps go `pending -> enqueued -> succeeded | failed | cancelled`, or
`skipped` when the run halts first. `failed` and `cancelled` runs enqueue their
pipeline's cleanup job, once, in the transaction that ends them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from conveyor import codec
from conveyor.db.control import control_channel
from conveyor.errors import (
    DatabaseError,
    InvalidArguments,
    RunNotFound,
    RunNotRetryable,
)
from conveyor.polling import poll_until

if TYPE_CHECKING:
    from conveyor.app import App
    from conveyor.db.database import Row


class RunState(StrEnum):
    """Where a run is in its life; compares equal to its string value."""

    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True once the run ended (only an operator retry moves it on)."""
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


class StepState(StrEnum):
    """Where one step of a run is."""

    PENDING = "pending"
    ENQUEUED = "enqueued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"


@dataclass(frozen=True, kw_only=True)
class RunStep:
    """One step of a run, with its current job's live state."""

    name: str
    position: int
    depends_on: list[str]
    state: StepState
    task: str
    queue: str
    job_id: int | None = None
    job_state: str | None = None
    """The current job's state (available, running, ...), while it has one."""
    attempts: int = 0
    result: Any = None
    error: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @classmethod
    def from_row(cls, row: Row) -> RunStep:
        """Build from a `run_steps_get` row."""
        return cls(
            name=row["name"],
            position=row["position"],
            depends_on=list(row["depends_on"]),
            state=StepState(row["state"]),
            task=row["task"],
            queue=row["queue"],
            job_id=row["job_id"],
            job_state=row["job_state"],
            attempts=row["job_attempt"] or row["attempts"] or 0,
            result=codec.decode(row["result"]),
            error=row["error"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
        )


@dataclass(frozen=True, kw_only=True)
class Run:
    """A snapshot of one pipeline run (with its steps when read by `app.runs.get`)."""

    id: int
    pipeline: str
    state: RunState
    key: str | None
    input: Any
    metadata: dict[str, Any]
    data: dict[str, Any]
    """The run-scoped state steps read and write through `ctx.run`."""
    counters: dict[str, int]
    failed_step: str | None
    error: dict[str, Any] | None
    cleanup_job_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    steps: tuple[RunStep, ...] = field(default=())

    @classmethod
    def from_row(cls, row: Row, steps: tuple[RunStep, ...] = ()) -> Run:
        """Build from a `runs` row, decoding what the codec encoded."""
        return cls(
            id=row["id"],
            pipeline=row["pipeline"],
            state=RunState(row["state"]),
            key=row["key"],
            input=codec.decode(row["input"]),
            metadata=codec.decode(row["metadata"]),
            data=codec.decode_values(row["data"]),
            counters=dict(row["counters"]),
            failed_step=row["failed_step"],
            error=row["error"],
            cleanup_job_id=row["cleanup_job_id"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            steps=steps,
        )

    @property
    def results(self) -> dict[str, Any]:
        """The results of the steps that succeeded, by step name."""
        return {s.name: s.result for s in self.steps if s.state == StepState.SUCCEEDED}

    def step(self, name: str) -> RunStep:
        """The step called `name`; raises KeyError."""
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)


@dataclass(frozen=True, kw_only=True)
class RunFailure:
    """What a pipeline's `on_failure` cleanup receives."""

    run_id: int
    pipeline: str
    state: RunState
    """`failed` or `cancelled`."""
    failed_step: str | None
    """The step that failed for good (or was cancelled: a step raising `Cancel`, or
    its job cancelled, cancels its run); None when the run itself was cancelled."""
    error: dict[str, Any] | None
    """That step's last error record (type, message, traceback), or the cancel reason."""
    results: dict[str, Any]
    """Results of the steps that succeeded before the run halted."""
    input: Any
    metadata: dict[str, Any]


class Runs:
    """Read and operate on runs: `app.runs.get(id)`, `.recent()`, `.cancel(id)`, `.retry(id)`."""

    def __init__(self, app: App) -> None:
        self._app = app

    @property
    def _channel(self) -> str:
        return control_channel(self._app.config.schema)

    async def get(self, run_id: int) -> Run:
        """One run with its steps; raises `RunNotFound`."""
        rows = await self._app.db.fetch("read run", "run_get", {"id": run_id})
        if not rows:
            raise RunNotFound(run_id)
        return (await self._with_steps(rows))[0]

    async def get_many(self, run_ids: list[int]) -> list[Run]:
        """Several runs with their steps, by id (missing ids are left out)."""
        rows = await self._app.db.fetch("read runs", "run_get_many", {"ids": run_ids})
        return await self._with_steps(rows)

    async def recent(
        self,
        *,
        pipeline: str | None = None,
        state: str | None = None,
        limit: int = 50,
        with_steps: bool = False,
    ) -> list[Run]:
        """Recent runs, newest first (with their steps when `with_steps`)."""
        if state is not None and state not in {s.value for s in RunState}:
            raise InvalidArguments(
                f"unknown run state {state!r}; one of {[s.value for s in RunState]}"
            )
        rows = await self._app.db.fetch(
            "list runs", "run_list", {"pipeline": pipeline, "state": state, "limit": limit}
        )
        if with_steps:
            return await self._with_steps(rows)
        return [Run.from_row(row) for row in rows]

    async def counts(self) -> dict[str, dict[str, int]]:
        """`{pipeline: {state: count}}`."""
        rows = await self._app.db.fetch("count runs", "run_count_by_state")
        counts: dict[str, dict[str, int]] = {}
        for row in rows:
            counts.setdefault(row["pipeline"], {})[row["state"]] = row["count"]
        return counts

    async def cancel(self, run_id: int, *, reason: str = "cancelled by request") -> Run:
        """Cancel a run: its running step is cancelled, no new step starts, the
        cleanup runs. A run that already ended is returned unchanged."""
        rows = await self._app.db.fetch(
            "cancel run", "run_cancel", {"id": run_id, "reason": reason, "channel": self._channel}
        )
        if not rows or rows[0]["id"] is None:
            raise RunNotFound(run_id)
        return await self.get(run_id)

    async def retry(self, run_id: int) -> Run:
        """Run a failed or cancelled run again from the steps that did not succeed.

        Raises `RunNotRetryable` if the run did not fail or was not cancelled, or
        a step it cancelled is still stopping, or its cleanup has not run yet
        (try again once they ended).
        """
        with _not_retryable_as_typed_error(run_id):
            # Not resent after a lost connection: the first try may have applied.
            rows = await self._app.db.fetch(
                "retry run",
                "run_retry",
                {"id": run_id, "channel": self._channel},
                idempotent=False,
            )
        if not rows or rows[0]["id"] is None:
            raise RunNotFound(run_id)
        return await self.get(run_id)

    async def wait(self, run_id: int, timeout: float | timedelta | None = None) -> Run:
        """Wait until the run ended (succeeded, failed or cancelled); raises `WaitTimeout`."""
        return await poll_until(
            lambda: self.get(run_id),
            lambda run: run.state.is_terminal,
            timeout,
            lambda run: f"run {run_id} is still {run.state}",
        )

    async def _with_steps(self, rows: list[Row]) -> list[Run]:
        if not rows:
            return []
        step_rows = await self._app.db.fetch(
            "read run steps", "run_steps_get", {"ids": [row["id"] for row in rows]}
        )
        steps: dict[int, list[RunStep]] = {}
        for step_row in step_rows:
            steps.setdefault(step_row["run_id"], []).append(RunStep.from_row(step_row))
        return [Run.from_row(row, tuple(steps.get(row["id"], ()))) for row in rows]


@contextmanager
def _not_retryable_as_typed_error(run_id: int) -> Iterator[None]:
    try:
        yield
    except DatabaseError as exc:
        if exc.sqlstate == "CVR01":
            message = str(exc.__cause__ or exc).splitlines()[0]
            raise RunNotRetryable(message) from exc
        raise
