"""The App: task registry, enqueueing, reading jobs, and migrations.

```python
from conveyor import App

app = App()                       # CONVEYOR_DATABASE_URL, else embedded PostgreSQL

@app.task(queue="default", max_attempts=3)
async def add(ctx, a: int, b: int) -> int:
    return a + b

job = await add.enqueue(a=1, b=2)
done = await app.wait(job.id, timeout=10)   # done.state == "succeeded", done.result == 3
```
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, overload

import psycopg

from conveyor.collector import collector_paused
from conveyor.config import Config
from conveyor.db.columns import columns
from conveyor.db.control import control_channel
from conveyor.db.database import Database, Row
from conveyor.enqueue_plan import (
    DedupKey,
    InsertPlan,
    assemble,
    deduplicated_ids,
    missing_dedup_keys,
    plan_insert,
)
from conveyor.errors import (
    DatabaseError,
    InvalidJobOptions,
    InvalidPipeline,
    JobNotFound,
    QueueFull,
    TaskNotFound,
)
from conveyor.jobs import Job, KeyStats, QueueStats, WorkerInfo
from conveyor.locks.advisory import AdvisoryLock, LockInfo, is_locked, list_locks, xact_lock
from conveyor.locks.keys import LockKey
from conveyor.maintenance.pruner import PruneReport, prune
from conveyor.migrations.migrator import check_schema, migrate
from conveyor.partitions import Partitions
from conveyor.pipeline import Pipeline, Step
from conveyor.polling import poll_until
from conveyor.retry import DEFAULT_RETRY, RetryPolicy
from conveyor.runs import Runs
from conveyor.tasks import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_QUEUE,
    EncodedJob,
    JobSpec,
    KeySource,
    RateLimit,
    Task,
    TaskFunction,
    TaskOptions,
    check_concurrency_limit,
    check_key,
)
from conveyor.windows import ExecutionWindow, as_window


class App:
    """A set of tasks bound to one PostgreSQL database and schema."""

    def __init__(
        self,
        database_url: str | None = None,
        *,
        schema: str | None = None,
        config: Config | None = None,
    ) -> None:
        base = config or Config.from_env()
        overrides: dict[str, Any] = {}
        if database_url is not None:
            overrides["database_url"] = database_url
        if schema is not None:
            overrides["schema"] = schema
        self.config = Config(**{**_fields(base), **overrides})
        self.db = Database(self.config)
        self.tasks: dict[str, Task] = {}
        self.pipelines: dict[str, Pipeline] = {}
        self.runs = Runs(self)
        """Pipeline runs: `get`, `recent`, `cancel`, `retry`, `wait`."""
        self.partitions = Partitions(self)
        """Per-task partitions of the jobs table: `all`, `create`, `remove`, `sync`."""

    def __repr__(self) -> str:
        return f"<App schema={self.config.schema} tasks={len(self.tasks)}>"

    # -- registry ----------------------------------------------------------

    @overload
    def task(self, func: TaskFunction, /) -> Task: ...

    @overload
    def task(
        self,
        /,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout: timedelta | float | None = None,
        concurrency_limit: int | None = None,
        concurrency_key: KeySource | None = None,
        max_queue_length: int | None = None,
        window: ExecutionWindow | str | None = None,
        rate_limit: RateLimit | None = None,
        partition: bool = False,
    ) -> Callable[[TaskFunction], Task]: ...

    def task(
        self,
        func: TaskFunction | None = None,
        /,
        *,
        name: str | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout: timedelta | float | None = None,
        concurrency_limit: int | None = None,
        concurrency_key: KeySource | None = None,
        max_queue_length: int | None = None,
        window: ExecutionWindow | str | None = None,
        rate_limit: RateLimit | None = None,
        partition: bool = False,
    ) -> Task | Callable[[TaskFunction], Task]:
        """Register a task function (sync or async); its first parameter is the `JobContext`."""
        if isinstance(timeout, int | float):
            timeout = timedelta(seconds=timeout)
        options = TaskOptions(
            queue=queue,
            priority=priority,
            max_attempts=max_attempts,
            retry=retry,
            timeout=timeout,
            concurrency_limit=concurrency_limit,
            concurrency_key=concurrency_key,
            max_queue_length=max_queue_length,
            window=as_window(window),
            rate_limit=rate_limit,
            partition=partition,
        )

        def register(fn: TaskFunction) -> Task:
            task_name = name or f"{fn.__module__}.{fn.__qualname__}"
            task = Task(self, fn, task_name, options)
            self.tasks[task_name] = task
            return task

        return register(func) if func is not None else register

    def pipeline(
        self,
        name: str,
        steps: Sequence[Step] = (),
        *,
        on_failure: TaskFunction | None = None,
    ) -> Pipeline:
        """Declare a pipeline: give its `steps` as a list, or add them with
        `@pipeline.step()`; `on_failure(ctx, failure)` runs once when a run halts.
        Raises `InvalidPipeline` (unknown steps, cycles, duplicates)."""
        if name in self.pipelines:
            raise InvalidPipeline(f"pipeline {name!r} is already declared")
        declared = Pipeline(self, name, steps, on_failure=on_failure)
        self.pipelines[name] = declared
        return declared

    def get_task(self, name: str) -> Task:
        """The registered task called `name`; raises `TaskNotFound`."""
        try:
            return self.tasks[name]
        except KeyError:
            raise TaskNotFound(name, list(self.tasks)) from None

    # -- enqueue -----------------------------------------------------------

    async def enqueue(
        self,
        task: str | Task,
        args: dict[str, Any] | None = None,
        *,
        connection: psycopg.AsyncConnection[Any] | None = None,
        **options: Any,
    ) -> Job:
        """Enqueue one job of `task` (a name or a Task) with `args` and per-job options."""
        resolved = self.get_task(task) if isinstance(task, str) else task
        call = resolved.configure(connection=connection, **options)
        return await call.enqueue(**(args or {}))

    async def enqueue_many(
        self,
        specs: Iterable[JobSpec],
        *,
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[Job]:
        """Enqueue jobs all-or-nothing, in one statement per few thousand; ids follow input order.

        With `connection`, the jobs are written in the caller's transaction and
        exist only if it commits (workers are woken at that commit).
        """
        encoded = self._encode(specs)
        plan = plan_insert(encoded)
        if connection is not None or not plan.needs_transaction:
            return await self._insert(encoded, plan, connection)
        async with self.db.connection() as conn, conn.transaction():
            return await self._insert(encoded, plan, conn)

    def enqueue_sync(
        self,
        task: str | Task,
        args: dict[str, Any] | None = None,
        *,
        connection: psycopg.Connection[Any] | None = None,
        **options: Any,
    ) -> Job:
        """Sync twin of `enqueue`."""
        resolved = self.get_task(task) if isinstance(task, str) else task
        return resolved.configure(connection=connection, **options).enqueue_sync(**(args or {}))

    def enqueue_many_sync(
        self,
        specs: Iterable[JobSpec],
        *,
        connection: psycopg.Connection[Any] | None = None,
    ) -> list[Job]:
        """Sync twin of `enqueue_many`."""
        encoded = self._encode(specs)
        plan = plan_insert(encoded)
        if connection is not None or not plan.needs_transaction:
            return self._insert_sync(encoded, plan, connection)
        with self.db.sync_pool().connection() as conn, conn.transaction():
            return self._insert_sync(encoded, plan, conn)

    def _encode(self, specs: Iterable[JobSpec]) -> list[EncodedJob]:
        encoded = []
        with collector_paused():
            for spec in specs:
                task = self.get_task(spec.task)
                task.check_arguments(spec.args)
                encoded.append(spec.encode(self.config.max_payload_bytes))
        return encoded

    async def _insert(
        self,
        jobs: Sequence[EncodedJob],
        plan: InsertPlan,
        conn: psycopg.AsyncConnection[Any] | None,
    ) -> list[Job]:
        channel = control_channel(self.config.schema)
        if plan.supersede_running:
            await self.db.fetch(
                "supersede running jobs",
                "job_supersede_running",
                _dedup_params(plan.supersede_running, channel),
                conn=conn,
            )
        rows: list[Row] = []
        with _queue_full_as_typed_error():
            if conn is None:  # at most one statement (see InsertPlan.needs_transaction)
                for supersede, chunk in plan.statements:
                    rows += await self.db.fetch(
                        "enqueue jobs",
                        "job_insert_many",
                        _insert_params(chunk, supersede),
                        idempotent=False,
                    )
            else:
                for batch in await self.db.fetch_each(
                    "enqueue jobs", "job_insert_many", _each_insert_params(plan), conn=conn
                ):
                    rows += batch
        whole: list[Row] = []
        if deduplicated := deduplicated_ids(rows):
            whole += await self.db.fetch(
                "read deduplicated jobs", "job_get_many", {"ids": deduplicated}, conn=conn
            )
        if missing := missing_dedup_keys(plan, rows):
            whole += await self.db.fetch(
                "find deduplicated jobs",
                "job_get_by_dedup_keys",
                _dedup_params(missing, None),
                conn=conn,
            )
        with collector_paused():
            return assemble(jobs, rows, whole)

    def _insert_sync(
        self,
        jobs: Sequence[EncodedJob],
        plan: InsertPlan,
        conn: psycopg.Connection[Any] | None,
    ) -> list[Job]:
        channel = control_channel(self.config.schema)
        if plan.supersede_running:
            self.db.fetch_sync(
                "supersede running jobs",
                "job_supersede_running",
                _dedup_params(plan.supersede_running, channel),
                conn=conn,
            )
        rows: list[Row] = []
        with _queue_full_as_typed_error():
            if conn is None:  # at most one statement (see InsertPlan.needs_transaction)
                for supersede, chunk in plan.statements:
                    rows += self.db.fetch_sync(
                        "enqueue jobs",
                        "job_insert_many",
                        _insert_params(chunk, supersede),
                        idempotent=False,
                    )
            else:
                for batch in self.db.fetch_each_sync(
                    "enqueue jobs", "job_insert_many", _each_insert_params(plan), conn=conn
                ):
                    rows += batch
        whole: list[Row] = []
        if deduplicated := deduplicated_ids(rows):
            whole += self.db.fetch_sync(
                "read deduplicated jobs", "job_get_many", {"ids": deduplicated}, conn=conn
            )
        if missing := missing_dedup_keys(plan, rows):
            whole += self.db.fetch_sync(
                "find deduplicated jobs",
                "job_get_by_dedup_keys",
                _dedup_params(missing, None),
                conn=conn,
            )
        with collector_paused():
            return assemble(jobs, rows, whole)

    # -- read --------------------------------------------------------------

    async def get_job(self, job_id: int) -> Job:
        """The current state of job `job_id`; raises `JobNotFound`."""
        rows = await self.db.fetch("get job", "job_get", {"id": job_id})
        if not rows:
            raise JobNotFound(job_id)
        return Job.from_row(rows[0])

    def get_job_sync(self, job_id: int) -> Job:
        """Sync twin of `get_job`."""
        rows = self.db.fetch_sync("get job", "job_get", {"id": job_id})
        if not rows:
            raise JobNotFound(job_id)
        return Job.from_row(rows[0])

    async def get_jobs(self, job_ids: Sequence[int]) -> list[Job]:
        """Several jobs by id, in id order (missing ids are left out)."""
        rows = await self.db.fetch("get jobs", "job_get_many", {"ids": list(job_ids)})
        return [Job.from_row(r) for r in rows]

    async def wait(self, job_id: int, timeout: float | timedelta | None = None) -> Job:
        """Wait until job `job_id` is terminal and return it; raises `WaitTimeout`."""
        return await poll_until(
            lambda: self.get_job(job_id),
            lambda job: job.is_finished,
            timeout,
            lambda job: f"job {job_id} is still {job.state}",
        )

    async def counts(self) -> dict[str, dict[str, int]]:
        """`{queue: {state: count}}` over all jobs."""
        rows = await self.db.fetch("count jobs", "job_count_by_queue_state")
        return _nest_counts(rows)

    def counts_sync(self) -> dict[str, dict[str, int]]:
        """Sync twin of `counts`."""
        return _nest_counts(self.db.fetch_sync("count jobs", "job_count_by_queue_state"))

    # -- cancellation and workers ------------------------------------------

    async def cancel(self, job_id: int, *, reason: str = "cancelled by request") -> Job:
        """Cancel one job and return it.

        A waiting job ends `cancelled` at once and never runs. A running job gets
        a cancel request: its worker hears it at once through NOTIFY (or at its next
        heartbeat when it does not listen), stops the attempt and records `cancelled`.
        A finished job is returned unchanged. Raises `JobNotFound`.
        """
        await self.cancel_many(ids=[job_id], reason=reason)
        return await self.get_job(job_id)

    async def cancel_many(
        self,
        *,
        ids: Sequence[int] | None = None,
        queue: str | None = None,
        task: str | None = None,
        reason: str = "cancelled by request",
    ) -> dict[int, str]:
        """Cancel every unfinished job matching all the given filters.

        Returns `{job_id: "cancelled" | "cancel_requested"}`. With no filter at
        all it refuses (ConveyorError) rather than cancel everything by accident.
        """
        if ids is None and queue is None and task is None:
            raise InvalidJobOptions("cancel_many needs ids, queue or task")
        rows = await self.db.fetch(
            "cancel jobs",
            "job_cancel_many",
            {
                "ids": None if ids is None else list(ids),
                "queue": queue,
                "task": task,
                "reason": reason,
                "channel": control_channel(self.config.schema),
            },
        )
        return {int(r["id"]): str(r["outcome"]) for r in rows}

    async def workers(self, *, live_only: bool = False) -> list[WorkerInfo]:
        """The worker registry, newest first."""
        rows = await self.db.fetch("list workers", "worker_list", {"live_only": live_only})
        return [WorkerInfo.from_row(r) for r in rows]

    async def stop_workers(self, worker_id: str | None = None) -> list[str]:
        """Ask one live worker (or all, with None) to drain and exit; returns their ids."""
        rows = await self.db.fetch(
            "request worker stop",
            "worker_request_stop",
            {"worker_id": worker_id, "channel": control_channel(self.config.schema)},
        )
        return [str(r["id"]) for r in rows]

    # -- concurrency keys ---------------------------------------------------

    async def keys(self, *, queue: str | None = None) -> list[KeyStats]:
        """Per-key limits and counts (waiting, running, totals), kept by the database."""
        rows = await self.db.fetch("list keys", "key_list", {"queue": queue})
        return [KeyStats.from_row(r) for r in rows]

    async def queue_stats(self) -> list[QueueStats]:
        """Per-queue counts and totals, kept by the database in every job's transaction."""
        rows = await self.db.fetch("read queue stats", "queue_stats")
        return [QueueStats.from_row(r) for r in rows]

    async def set_limit(self, key: str, limit: int, *, queue: str = DEFAULT_QUEUE) -> KeyStats:
        """Change (or create) a key's limit; the next claim uses it."""
        check_key(key)
        if limit is None:
            raise InvalidJobOptions("concurrency_limit must be an integer >= 1, got None")
        check_concurrency_limit(limit)
        rows = await self.db.fetch(
            "set key limit", "key_set_limit", {"queue": queue, "key": key, "limit": limit}
        )
        return KeyStats.from_row(rows[0])

    # -- retention -----------------------------------------------------------

    async def prune(
        self,
        *,
        older_than: timedelta,
        states: Sequence[str] = ("succeeded", "failed", "cancelled"),
    ) -> PruneReport:
        """Delete jobs and pipeline runs in `states` (terminal ones) that finished
        more than `older_than` ago, in batches; returns how many went."""
        return await prune(self.db, older_than=older_than, states=states)

    # -- locks -------------------------------------------------------------

    def lock(
        self, key: LockKey, *, timeout: float | timedelta | None = None, owner: str | None = None
    ) -> AdvisoryLock:
        """A PostgreSQL advisory lock on `key` (a string, or two int4s like `(2026, 3)`),
        held on its own connection: `async with app.lock("k", timeout=5): ...`.
        `timeout` is how long `async with` waits (None: as long as it takes)."""
        return AdvisoryLock(self.db, key, owner=owner, timeout=timeout)

    async def xact_lock(
        self,
        connection: psycopg.AsyncConnection[Any],
        key: LockKey,
        timeout: float | timedelta | None = None,
    ) -> bool:
        """Take a transaction-level advisory lock in `connection`'s open transaction
        (released at commit/rollback); False if `timeout` passed first."""
        return await xact_lock(self.db, connection, key, timeout)

    async def is_locked(self, key: LockKey) -> bool:
        """Whether any session holds the advisory lock of `key`."""
        return await is_locked(self.db, key)

    async def list_locks(self) -> list[LockInfo]:
        """Every advisory lock of the database: holder pid, application, key, owner, since."""
        return await list_locks(self.db)

    # -- schema and lifecycle ----------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply pending schema migrations; returns the versions applied."""
        return await asyncio.to_thread(self.migrate_sync)

    def migrate_sync(self) -> list[int]:
        """Sync twin of `migrate`."""
        return migrate(self.db.conninfo, self.config.schema)

    def check_schema(self) -> int:
        """Raise `SchemaVersionError` unless the schema is at this code's version."""
        return check_schema(self.db.conninfo, self.config.schema)

    async def close(self) -> None:
        """Close this App's connection pools; safe to call twice."""
        await self.db.close()

    async def __aenter__(self) -> App:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


QUEUE_FULL_SQLSTATE = "CVQ01"
"""Raised by `<schema>.prepare_keys` (migration 0004) when a key's cap would be passed."""


@contextmanager
def _queue_full_as_typed_error() -> Iterator[None]:
    try:
        yield
    except DatabaseError as exc:
        cause = exc.__cause__
        if exc.sqlstate != QUEUE_FULL_SQLSTATE or not isinstance(cause, psycopg.Error):
            raise
        detail = json.loads(cause.diag.message_detail or "{}")
        raise QueueFull(
            detail["queue"], detail["key"], detail["waiting"], detail["incoming"], detail["cap"]
        ) from None


def _fields(config: Config) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def _insert_params(jobs: Sequence[EncodedJob], supersede: bool = False) -> dict[str, Any]:
    arrays = columns(
        jobs, "queue", "task", "args", "priority", "max_attempts", "run_at", "delay_s",
        "timeout_ms", "meta", "concurrency_key", "concurrency_limit", "max_queue_length",
        "window_start", "window_end", "window_tz", "dedup_key", "rate_limit", "rate_period_s",
    )  # fmt: skip
    # An option no job uses is sent as one NULL, not an array of them: unnest
    # pads it, and most options go unused in a typical batch.
    unused = {name for name, values in arrays.items() if values.count(None) == len(values)}
    return {"supersede": supersede} | {k: None if k in unused else v for k, v in arrays.items()}


def _each_insert_params(plan: InsertPlan) -> Iterator[dict[str, Any]]:
    # A generator: each batch's arrays are built just before it is sent.
    return (_insert_params(chunk, supersede) for supersede, chunk in plan.statements)


def _dedup_params(keys: Sequence[DedupKey], channel: str | None) -> dict[str, Any]:
    return {
        "task": [task for task, _ in keys],
        "dedup_key": [key for _, key in keys],
        "channel": channel,
    }


def _nest_counts(rows: list[Row]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row["queue"], {})[row["state"]] = int(row["count"])
    return counts
