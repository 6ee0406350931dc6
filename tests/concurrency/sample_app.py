"""The tasks the worker subprocesses of the concurrency tests run.

The test process builds the same app (same task names) to enqueue, so both
sides agree on names without depending on module paths.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from conveyor import App, JobContext

SCHEMA = "conveyor"

QUICK = "sample.quick"
RECORD = "sample.record"
GATE = "sample.gate"
RENDEZVOUS = "sample.rendezvous"
SPIN = "sample.spin"

EXECUTIONS_DDL = """
CREATE TABLE public.executions (
    job_id bigint NOT NULL,
    pid integer NOT NULL,
    worker_id text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
"""A side table where `record` and `rendezvous` note every execution (no unique key,
so a duplicate execution shows up as a duplicate row)."""

# How often a waiting task looks again; short so tests stay quick, long enough
# not to hammer two cores.
TASK_POLL_S = 0.02


def build_app(database_url: str) -> App:
    """An App on `database_url` with the sample tasks registered."""
    app = App(database_url, schema=SCHEMA)

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
            pool = await ctx.app.db.pool()
            async with pool.connection() as conn:
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

    return app


async def _note_execution(ctx: JobContext) -> None:
    pool = await ctx.app.db.pool()
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO public.executions (job_id, pid, worker_id) VALUES (%s, %s, %s)",
            (ctx.job.id, os.getpid(), ctx.worker_id),
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
