"""`ctx.step` checkpoints: a sub-step's result is recorded per job, so a retried attempt
gets it back without running the sub-step again; `atomic=True` commits the sub-step's own
writes with its checkpoint (exactly once across retries), and a lost lease rolls both back
with `LeaseLost`."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from conveyor import (
    App,
    FixedDelay,
    InvalidArguments,
    JobContext,
    JobState,
    LeaseLost,
    RunState,
)
from conveyor.testing import drain
from tests.integration.conftest import QUIET_WORKER, QueryDb, lease_taken_away

NO_DELAY = FixedDelay(timedelta(0))


async def side_table(query_db: QueryDb) -> None:
    await query_db("CREATE TABLE side (id serial PRIMARY KEY, job_id bigint, note text)")


async def test_retried_attempt_gets_recorded_sub_step_without_rerunning_it(
    app: App, query_db: QueryDb
) -> None:
    calls: list[str] = []

    def charge(amount: Decimal, *, currency: str) -> dict[str, Any]:
        calls.append("charge")
        return {"charged": amount, "currency": currency}

    async def email(to: str) -> str:
        calls.append("email")
        return f"sent to {to}"

    @app.task(name="checkout", max_attempts=3, retry=NO_DELAY)
    async def checkout(ctx: JobContext) -> list[Any]:
        first = await ctx.step("charge", charge, Decimal("9.99"), currency="EUR")
        if ctx.attempt == 1:
            raise RuntimeError("crash after the charge")
        second = await ctx.step("email", email, "a@example.com")
        return [str(first["charged"]), second]

    job = await checkout.enqueue()
    await drain(app)
    done = await app.get_job(job.id)
    assert done.state is JobState.SUCCEEDED
    assert done.attempt == 2
    assert calls == ["charge", "email"]
    assert done.result == ["9.99", "sent to a@example.com"]
    rows = await query_db(
        "SELECT name, value FROM conveyor.checkpoints WHERE job_id = %s ORDER BY name", job.id
    )
    assert [r["name"] for r in rows] == ["charge", "email"]
    assert rows[0]["value"] == {"charged": {"$decimal": "9.99"}, "currency": "EUR"}


async def test_recorded_values_keep_their_codec_types_and_none(app: App) -> None:
    seen: list[Any] = []
    values = {"none": None, "decimal": Decimal("1.10"), "tuple": (1, b"x"), "set": {1, 2}}

    @app.task(name="typed", max_attempts=2, retry=NO_DELAY)
    async def typed(ctx: JobContext) -> None:
        got = {name: await ctx.step(name, lambda v=value: v) for name, value in values.items()}
        seen.append(got)
        if ctx.attempt == 1:
            raise RuntimeError("again")

    await typed.enqueue()
    await drain(app)
    assert seen == [values, values]
    assert type(seen[1]["tuple"]) is tuple
    assert seen[1]["tuple"][1] == b"x"


async def test_same_name_twice_in_one_attempt_runs_once(app: App) -> None:
    calls: list[int] = []

    @app.task(name="twice")
    async def twice(ctx: JobContext) -> list[int]:
        def work() -> int:
            calls.append(1)
            return len(calls)

        return [await ctx.step("w", work), await ctx.step("w", work)]

    job = await twice.enqueue()
    await drain(app)
    assert (await app.get_job(job.id)).result == [1, 1]
    assert calls == [1]


async def test_sub_step_that_raises_is_not_recorded_and_runs_again(app: App) -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first call fails")
        return "second call works"

    @app.task(name="flaky_sub", max_attempts=2, retry=NO_DELAY)
    async def flaky_sub(ctx: JobContext) -> str:
        result: str = await ctx.step("flaky", flaky)
        return result

    job = await flaky_sub.enqueue()
    await drain(app)
    done = await app.get_job(job.id)
    assert done.state is JobState.SUCCEEDED
    assert done.result == "second call works"
    assert len(calls) == 2


async def test_bad_sub_step_names_are_refused(app: App) -> None:
    caught: list[str] = []

    @app.task(name="names")
    async def names(ctx: JobContext) -> None:
        for bad in ("", "a\x00b", 5):
            with pytest.raises(InvalidArguments):
                await ctx.step(bad, lambda: 1)  # type: ignore[arg-type]
            caught.append(repr(bad))

    await names.enqueue()
    await drain(app)
    assert len(caught) == 3


async def test_atomic_sub_step_writes_exactly_once_across_a_retry(
    app: App, query_db: QueryDb
) -> None:
    await side_table(query_db)
    attempts: list[int] = []

    async def insert(conn: psycopg.AsyncConnection[Any], note: str, job_id: int) -> int:
        cur = await conn.execute(
            "INSERT INTO side (job_id, note) VALUES (%s, %s) RETURNING id", (job_id, note)
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row["id"] if isinstance(row, dict) else row[0])

    @app.task(name="atomic_writer", max_attempts=3, retry=NO_DELAY)
    async def atomic_writer(ctx: JobContext) -> int:
        attempts.append(ctx.attempt)
        row_id: int = await ctx.step("insert", insert, "hello", ctx.job.id, atomic=True)
        if ctx.attempt < 3:
            raise RuntimeError("crash after the atomic write")
        return row_id

    job = await atomic_writer.enqueue()
    await drain(app)
    done = await app.get_job(job.id)
    assert done.state is JobState.SUCCEEDED
    assert attempts == [1, 2, 3]
    rows = await query_db("SELECT id, job_id, note FROM side")
    assert rows == [{"id": done.result, "job_id": job.id, "note": "hello"}]


async def test_atomic_sub_step_that_raises_rolls_back_its_writes(
    app: App, query_db: QueryDb
) -> None:
    await side_table(query_db)

    async def insert_then_fail(conn: psycopg.AsyncConnection[Any], attempt: int) -> str:
        await conn.execute("INSERT INTO side (note) VALUES (%s)", (f"attempt {attempt}",))
        if attempt == 1:
            raise RuntimeError("fails after writing")
        return "ok"

    @app.task(name="atomic_fails", max_attempts=2, retry=NO_DELAY)
    async def atomic_fails(ctx: JobContext) -> str:
        result: str = await ctx.step("write", insert_then_fail, ctx.attempt, atomic=True)
        return result

    job = await atomic_fails.enqueue()
    await drain(app)
    assert (await app.get_job(job.id)).state is JobState.SUCCEEDED
    assert await query_db("SELECT note FROM side") == [{"note": "attempt 2"}]


async def test_atomic_sub_step_with_a_lost_lease_rolls_back_and_raises_lease_lost(
    app: App, query_db: QueryDb
) -> None:
    await side_table(query_db)
    outcomes: list[str] = []

    async def insert(conn: psycopg.AsyncConnection[Any]) -> str:
        await conn.execute("INSERT INTO side (note) VALUES ('zombie write')")
        return "written"

    @app.task(name="zombie")
    async def zombie(ctx: JobContext) -> str:
        async with lease_taken_away(query_db, ctx.job.id):
            with pytest.raises(LeaseLost):
                await ctx.step("insert", insert, atomic=True)
            outcomes.append("atomic refused")
            with pytest.raises(LeaseLost):
                await ctx.step("plain", lambda: "value")
            outcomes.append("plain refused")
        return "survived"

    job = await zombie.enqueue()
    await drain(app, QUIET_WORKER)
    assert outcomes == ["atomic refused", "plain refused"]
    assert await query_db("SELECT * FROM side") == []
    assert await query_db("SELECT * FROM conveyor.checkpoints WHERE job_id = %s", job.id) == []
    assert (await app.get_job(job.id)).state is JobState.SUCCEEDED


async def test_checkpoints_work_inside_pipeline_steps(app: App) -> None:
    calls: list[str] = []
    pipe = app.pipeline("with_checkpoints")

    @pipe.step(max_attempts=2, retry=NO_DELAY)
    async def fetch(ctx: JobContext) -> Decimal:
        def expensive() -> Decimal:
            calls.append("expensive")
            return Decimal("2.50")

        value: Decimal = await ctx.step("expensive", expensive)
        if ctx.attempt == 1:
            raise RuntimeError("retry me")
        return value * 2

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED
    assert done.results == {"fetch": Decimal("5.00")}
    assert calls == ["expensive"]


async def test_concurrent_atomic_sub_steps_with_one_name_write_once(
    app: App, query_db: QueryDb
) -> None:
    """Two `ctx.step` calls with the same name in flight at once (asyncio.gather) must
    still give one recorded result and one committed write: the second must not commit
    its own writes next to the first's checkpoint and return its own value."""
    await side_table(query_db)

    async def insert(conn: psycopg.AsyncConnection[Any], who: str) -> str:
        await conn.execute("INSERT INTO side (note) VALUES (%s)", (who,))
        return who

    @app.task(name="racing")
    async def racing(ctx: JobContext) -> list[str]:
        results = await asyncio.gather(
            ctx.step("insert", insert, "first", atomic=True),
            ctx.step("insert", insert, "second", atomic=True),
            return_exceptions=True,
        )
        return [r if isinstance(r, str) else type(r).__name__ for r in results]

    job = await racing.enqueue()
    await drain(app)
    done = await app.get_job(job.id)
    rows = await query_db("SELECT note FROM side")
    recorded = await query_db(
        "SELECT value FROM conveyor.checkpoints WHERE job_id = %s AND name = 'insert'", job.id
    )
    assert len(recorded) == 1
    assert len(rows) == 1, f"{len(rows)} committed writes for one checkpoint; job: {done.result}"
    assert done.result == [recorded[0]["value"]] * 2
