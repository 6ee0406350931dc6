"""The tasks the worker subprocesses of the concurrency tests run.

The test process builds the same app (same task names) to enqueue, so both
sides agree on names without depending on module paths.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from conveyor import App, Config, ExponentialBackoff, JobContext
from tests.concurrency.pipeline_app import register_pipelines

SCHEMA = "conveyor"

QUICK = "sample.quick"
RECORD = "sample.record"
GATE = "sample.gate"
RENDEZVOUS = "sample.rendezvous"
SPIN = "sample.spin"
HOLD = "sample.hold"
POISON = "sample.poison"
STAMP = "sample.stamp"
KEYED = "sample.keyed"

POISON_MAX_ATTEMPTS = 3
STAMP_MAX_ATTEMPTS = 25
"""Far more than a server restart can cost a job (failed writes, rescues)."""
STAMP_RETRY = ExponentialBackoff(
    base=timedelta(milliseconds=100), max_delay=timedelta(seconds=1), jitter=0.5
)

EXECUTIONS_DDL = """
CREATE TABLE public.executions (
    job_id bigint NOT NULL,
    pid integer NOT NULL,
    worker_id text NOT NULL,
    attempt integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
"""A side table where most sample tasks note every execution (no unique key, so a
duplicate execution shows up as a duplicate row)."""

KEYED_LIMIT = 5
"""The limit a key of KEYED gets when its first enqueue does not say otherwise."""
WORK_SCALE_ENV = "SAMPLE_WORK_SCALE"
"""Multiplies KEYED's `work_s` in one worker process: workers of different speeds."""

GAUGE_DDL = """
CREATE TABLE public.gauge (
    key text PRIMARY KEY,
    n integer NOT NULL CHECK (n >= 0),
    peak integer NOT NULL
)
"""
"""Per concurrency key: how many KEYED jobs are inside their body now (n), and at most
ever (peak), counted by the tasks themselves in autocommit statements."""

# How often a waiting task looks again; short so tests stay quick, long enough
# not to hammer two cores.
TASK_POLL_S = 0.02


def build_app(database_url: str, *, pool_size: int | None = None, pooled: bool = False) -> App:
    """An App on `database_url` with the sample tasks and pipelines registered;
    `pool_size` overrides the configured pool size; `pooled` means the URL
    leads through a transaction-mode pooler that keeps no prepared statements."""
    config = Config.from_env(pool_size=pool_size)
    if pooled:
        config = dataclasses.replace(config, prepare_threshold=None)
    app = App(database_url, schema=SCHEMA, config=config)

    @app.task(name=QUICK)
    async def quick(ctx: JobContext, n: int) -> int:
        return n

    @app.task(name=RECORD)
    async def record(ctx: JobContext, n: int) -> int:
        await _note_execution(ctx)
        return n

    @app.task(name=GATE, max_attempts=1)
    async def gate(ctx: JobContext, path: str, timeout_s: float = 60.0) -> str:
        """Block until the file `path` exists (the test opens the gate)."""
        await _poll(lambda: _exists(path), timeout_s, f"gate {path}")
        return path

    @app.task(name=RENDEZVOUS, max_attempts=1)
    async def rendezvous(ctx: JobContext, parties: int, timeout_s: float = 30.0) -> int:
        """Note this execution, then wait until `parties` distinct processes have."""
        await _note_execution(ctx)

        async def enough() -> bool:
            async with ctx.app.db.connection() as conn:
                cur = await conn.execute("SELECT count(DISTINCT pid) AS n FROM public.executions")
                row = await cur.fetchone()
            assert row is not None
            return int(row["n"]) >= parties

        await _poll(enough, timeout_s, f"{parties} parties")
        return os.getpid()

    @app.task(name=SPIN, max_attempts=1)
    def spin(ctx: JobContext, timeout_s: float = 60.0) -> str:
        """A sync task that runs until the worker asks it to stop (`ctx.cancelled`)."""
        deadline = time.monotonic() + timeout_s
        while not ctx.cancelled:
            if time.monotonic() > deadline:
                raise TimeoutError(f"never asked to stop within {timeout_s}s")
            time.sleep(TASK_POLL_S)
        return "stopped"

    _register_crash_tasks(app)
    _register_keyed_tasks(app)
    register_pipelines(app)
    return app


def _register_crash_tasks(app: App) -> None:
    """The tasks of the crash and fault tests (test_crash.py, test_faults.py)."""

    @app.task(name=HOLD)
    async def hold(ctx: JobContext, gate: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """Note this execution, block until the file `gate` exists, and say who ran it.

        `{attempt}` in `gate` is replaced by the attempt's number: each attempt can
        have its own gate."""
        await _note_execution(ctx)
        path = gate.format(attempt=ctx.attempt)
        await _poll(lambda: _exists(path), timeout_s, f"gate {path}")
        return _stamp(ctx)

    @app.task(name=POISON, max_attempts=POISON_MAX_ATTEMPTS)
    async def poison(ctx: JobContext) -> None:
        """Note this execution, then kill the worker process running it (an OOM kill)."""
        await _note_execution(ctx)
        os.kill(os.getpid(), signal.SIGKILL)

    @app.task(name=STAMP, max_attempts=STAMP_MAX_ATTEMPTS, retry=STAMP_RETRY)
    async def stamp(ctx: JobContext, n: int, work_s: float = 0.0) -> dict[str, Any]:
        """Note this execution, work for `work_s`, and say which attempt of which worker
        produced the result."""
        await _note_execution(ctx)
        await asyncio.sleep(work_s)
        return {"n": n, **_stamp(ctx)}


def _register_keyed_tasks(app: App) -> None:
    """The tasks of the concurrency-key tests (test_keys_processes.py)."""

    @app.task(name=KEYED, max_attempts=1, concurrency_limit=KEYED_LIMIT, concurrency_key="{key}")
    async def keyed(ctx: JobContext, key: str, n: int, work_s: float = 0.0) -> int:
        """Count itself in the key's gauge for as long as it works: the gauge's peak is
        how many jobs of the key really ran at once, whatever the database believed."""
        await _gauge(ctx, key, _GAUGE_ENTER)
        await _note_execution(ctx)
        await asyncio.sleep(work_s * float(os.environ.get(WORK_SCALE_ENV, "1")))
        await _gauge(ctx, key, _GAUGE_LEAVE)
        return n


_GAUGE_ENTER = """
INSERT INTO public.gauge AS g (key, n, peak) VALUES (%s, 1, 1)
ON CONFLICT (key) DO UPDATE SET n = g.n + 1, peak = greatest(g.peak, g.n + 1)
"""
_GAUGE_LEAVE = "UPDATE public.gauge SET n = n - 1 WHERE key = %s"


async def _gauge(ctx: JobContext, key: str, statement: str) -> None:
    async with ctx.app.db.connection() as conn:
        await conn.execute(statement, (key,))


def _stamp(ctx: JobContext) -> dict[str, Any]:
    return {"worker": ctx.worker_id, "attempt": ctx.attempt, "pid": os.getpid()}


async def _note_execution(ctx: JobContext) -> None:
    async with ctx.app.db.connection() as conn:
        await conn.execute(
            "INSERT INTO public.executions (job_id, pid, worker_id, attempt)"
            " VALUES (%s, %s, %s, %s)",
            (ctx.job.id, os.getpid(), ctx.worker_id, ctx.attempt),
        )


async def _exists(path: str) -> bool:
    return Path(path).exists()


async def _poll(condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await condition():
        if loop.time() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout_s}s")
        await asyncio.sleep(TASK_POLL_S)
