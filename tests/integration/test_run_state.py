"""Run state and counters through the database: every codec type survives a real jsonb round
trip (also property-tested against a jsonb column), large states round trip, concurrent
fan-out writes merge, writes are fenced by the attempt's lease token, and counters persist
across attempts and enforce their ceiling by failing the step for good."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conveyor import (
    App,
    FixedDelay,
    InvalidArguments,
    JobContext,
    LeaseLost,
    RunFailure,
    RunState,
    StepState,
    codec,
)
from conveyor.testing import drain
from tests.integration.conftest import QUIET_WORKER, QueryDb, lease_taken_away

NO_DELAY = FixedDelay(timedelta(0))
ALL_TYPES: dict[str, Any] = {
    "none": None,
    "bool": True,
    "int": -(2**70),
    "float": 0.1,
    "big_float": 1e300,
    "neg_zero": -0.0,
    "inf": float("inf"),
    "decimal": Decimal("10.50"),
    "aware": datetime(2026, 3, 1, 12, 30, 15, 250, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    "naive": datetime(2026, 3, 1, 12, 30),
    "utc": datetime(2026, 3, 1, tzinfo=UTC),
    "date": date(2026, 2, 28),
    "time": time(8, 15, 0, 5),
    "timedelta": timedelta(days=2, microseconds=3),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "bytes": b"\x00\x01\xfe\xff",
    "tuple": (1, "two", (3.5,)),
    "set": {1, 2, 3},
    "nul": "a\x00b",
    "odd_keys": {1: "one", (2, 3): "pair", "$decimal": "not a tag", None: "none"},
    "nested": {"list": [Decimal("1"), {"when": date(2026, 1, 1)}], "dollar": {"$x": [b"x"]}},
}


def assert_same(expected: Any, actual: Any) -> None:
    assert actual == expected
    assert type(actual) is type(expected)
    if isinstance(expected, float):
        assert math.copysign(1, actual) == math.copysign(1, expected)
    if isinstance(expected, datetime):
        assert actual.utcoffset() == expected.utcoffset()


async def test_state_set_get_update_delete_round_trip_every_codec_type(app: App) -> None:
    seen: dict[str, Any] = {}
    pipe = app.pipeline("state")

    @pipe.step()
    async def write(ctx: JobContext) -> None:
        assert await ctx.run.state() == {}
        assert await ctx.run.get("missing", "fallback") == "fallback"
        first, *rest = ALL_TYPES
        await ctx.run.set(first, ALL_TYPES[first])
        await ctx.run.update(
            {k: ALL_TYPES[k] for k in rest[:5]}, **{k: ALL_TYPES[k] for k in rest[5:]}
        )
        await ctx.run.set("doomed", 1)
        await ctx.run.set("also_doomed", 2)
        await ctx.run.delete("doomed", "also_doomed", "never_there")
        seen["in_step"] = await ctx.run.state()

    @pipe.step()
    async def read(ctx: JobContext) -> None:
        seen["next_step"] = await ctx.run.state()
        seen["one"] = await ctx.run.get("decimal")

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED, done
    for state in (seen["in_step"], seen["next_step"], done.data):
        assert set(state) == set(ALL_TYPES)
        for name, value in ALL_TYPES.items():
            assert_same(value, state[name])
    assert_same(Decimal("10.50"), seen["one"])


async def test_state_names_may_start_with_a_dollar(app: App) -> None:
    """A run state name is any non-empty string; `$price` alone must not be read back as
    a codec tag (the state document is decoded as a whole, so a lone `$` name is)."""
    seen: dict[str, Any] = {}
    pipe = app.pipeline("dollar")

    @pipe.step()
    async def write(ctx: JobContext) -> None:
        await ctx.run.set("$price", Decimal("9.99"))
        seen["state"] = await ctx.run.state()

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED, done.steps[0].error
    assert seen["state"] == {"$price": Decimal("9.99")}
    assert done.data == {"$price": Decimal("9.99")}


async def test_state_of_about_a_megabyte_round_trips(app: App) -> None:
    big = {
        f"item-{i}": {
            "id": i,
            "price": Decimal(f"{i}.99"),
            "tags": [f"tag-{i}-{j}" for j in range(20)],
            "nested": {"when": date(2026, 1, 1 + i % 28), "blob": "x" * 8_000},
        }
        for i in range(120)
    }
    seen: dict[str, Any] = {}
    pipe = app.pipeline("big")

    @pipe.step()
    async def write(ctx: JobContext) -> None:
        await ctx.run.update(big)

    @pipe.step()
    async def read(ctx: JobContext) -> None:
        seen["state"] = await ctx.run.state()

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED, done
    assert len(codec.dumps(big)) > 1_000_000
    assert seen["state"] == big
    assert done.data == big


async def test_parallel_fan_out_steps_writing_different_names_are_both_kept(app: App) -> None:
    both_running = asyncio.Event()
    started: list[str] = []
    pipe = app.pipeline("fanout_state")

    @pipe.step()
    async def root(ctx: JobContext) -> None:
        await ctx.run.set("root", 0)

    async def branch(ctx: JobContext) -> None:
        assert ctx.run.step is not None
        started.append(ctx.run.step)
        if len(started) == 2:
            both_running.set()
        await asyncio.wait_for(both_running.wait(), timeout=10)
        for i in range(10):
            await ctx.run.set(f"{ctx.run.step}-{i}", i)

    pipe.step(name="left", depends_on=["root"])(branch)
    pipe.step(name="right", depends_on=["root"])(branch)

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED, done
    expected = {"root": 0, **{f"{side}-{i}": i for side in ("left", "right") for i in range(10)}}
    assert done.data == expected


async def test_cleanup_reads_and_writes_the_run_state(app: App) -> None:
    seen: list[Any] = []
    pipe = app.pipeline("cleanup_state")

    @pipe.step(max_attempts=1)
    async def only(ctx: JobContext) -> None:
        await ctx.run.set("progress", Decimal("0.5"))
        raise RuntimeError("stop here")

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        seen.append(await ctx.run.get("progress"))
        await ctx.run.set("cleaned", True)

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.FAILED
    assert seen == [Decimal("0.5")]
    assert done.data == {"progress": Decimal("0.5"), "cleaned": True}


async def test_write_by_an_attempt_whose_lease_token_changed_raises_lease_lost(
    app: App, query_db: QueryDb
) -> None:
    caught: list[str] = []
    pipe = app.pipeline("fenced")

    @pipe.step()
    async def step(ctx: JobContext) -> str:
        await ctx.run.set("before", 1)
        await ctx.run.incr("hits")
        async with lease_taken_away(query_db, ctx.job.id):
            writes: list[Callable[[], Awaitable[object]]] = [
                lambda: ctx.run.set("stale", 1),
                lambda: ctx.run.update(stale=2),
                lambda: ctx.run.delete("before"),
                lambda: ctx.run.incr("hits"),
            ]
            for write in writes:
                with pytest.raises(LeaseLost):
                    await write()
                caught.append("lease lost")
        return "done"

    run = await pipe.start()
    await drain(app, QUIET_WORKER)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED, done
    assert caught == ["lease lost"] * 4
    assert done.data == {"before": 1}
    assert done.counters == {"hits": 1}


async def test_state_names_must_be_non_empty_strings(app: App) -> None:
    caught: list[type[BaseException]] = []
    pipe = app.pipeline("names")

    @pipe.step()
    async def step(ctx: JobContext) -> None:
        bad_writes: list[Callable[[], Awaitable[object]]] = [
            lambda: ctx.run.set("", 1),
            lambda: ctx.run.set("a\x00", 1),
            lambda: ctx.run.incr(""),
        ]
        for bad in bad_writes:
            with pytest.raises(InvalidArguments):
                await bad()
            caught.append(InvalidArguments)
        with pytest.raises(InvalidArguments):
            await ctx.run.incr("n", by=True)
        with pytest.raises(InvalidArguments):
            await ctx.run.set("unencodable", object())

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED, done.steps[0].error
    assert len(caught) == 3
    assert done.data == {}


# -- counters --------------------------------------------------------------------


async def test_counter_increments_persist_across_attempts(app: App) -> None:
    values: list[int] = []
    pipe = app.pipeline("counting")

    @pipe.step(max_attempts=5, retry=NO_DELAY)
    async def flaky(ctx: JobContext) -> int:
        values.append(await ctx.run.incr("tries"))
        assert await ctx.run.counter("tries") == values[-1]
        if len(values) < 3:
            raise RuntimeError(f"attempt {ctx.attempt}")
        return await ctx.run.incr("tries", by=10)

    @pipe.step()
    async def after(ctx: JobContext) -> int:
        return await ctx.run.counter("tries") + await ctx.run.counter("never")

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.SUCCEEDED, done
    assert values == [1, 2, 3]
    assert done.results == {"flaky": 13, "after": 13}
    assert done.counters == {"tries": 13}
    assert done.step("flaky").attempts == 3


async def test_counter_past_its_ceiling_fails_the_step_for_good_and_runs_cleanup(
    app: App, query_db: QueryDb
) -> None:
    attempts: list[int] = []
    failures: list[RunFailure] = []
    pipe = app.pipeline("ceiling")

    @pipe.step()
    async def first(ctx: JobContext) -> str:
        return "ok"

    @pipe.step(max_attempts=10, retry=NO_DELAY)
    async def loop(ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        await ctx.run.incr("loops", max=2)
        raise RuntimeError("try again")

    @pipe.step()
    async def never(ctx: JobContext) -> None:
        raise AssertionError("must not run")

    @pipe.on_failure()
    async def cleanup(ctx: JobContext, failure: RunFailure) -> None:
        failures.append(failure)

    run = await pipe.start()
    await drain(app)
    done = await app.runs.get(run.id)
    assert done.state is RunState.FAILED
    assert attempts == [1, 2, 3]
    assert done.counters == {"loops": 3}
    assert done.failed_step == "loop"
    assert done.error is not None
    assert "CounterLimitExceeded" in done.error["type"]
    assert [s.state for s in done.steps] == [
        StepState.SUCCEEDED,
        StepState.FAILED,
        StepState.SKIPPED,
    ]
    assert done.step("loop").attempts == 3
    assert len(failures) == 1
    assert failures[0].failed_step == "loop"
    assert failures[0].results == {"first": "ok"}
    (job,) = await query_db(
        "SELECT state::text, attempt FROM conveyor.jobs WHERE task = 'ceiling:loop'"
    )
    assert job == {"state": "failed", "attempt": 3}


# -- the codec through a real jsonb column ----------------------------------------

jsonb_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(),
        st.text(alphabet=st.sampled_from(["\x00", "$", "a", "\udcff", "é"])),
        st.decimals(allow_nan=False),
        st.datetimes(),
        st.datetimes(timezones=st.just(UTC)),
        st.dates(),
        st.times(),
        st.timedeltas(),
        st.uuids(),
        st.binary(),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.text(), inner, max_size=4),
        st.dictionaries(st.integers() | st.text() | st.none(), inner, max_size=4),
        st.sets(st.integers() | st.text(), max_size=4),
        st.frozensets(st.integers() | st.text(), max_size=4),
    ),
    max_leaves=15,
)


def equal_with_nan(left: Any, right: Any) -> bool:
    if isinstance(left, float) and isinstance(right, float):
        if math.isnan(left):
            return math.isnan(right)
        return left == right and math.copysign(1, left) == math.copysign(1, right)
    if type(left) is not type(right):
        return False
    if isinstance(left, list | tuple):
        return len(left) == len(right) and all(
            equal_with_nan(x, y) for x, y in zip(left, right, strict=True)
        )
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(equal_with_nan(left[k], right[k]) for k in left)
    return bool(left == right)


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=jsonb_values)
def test_codec_round_trips_through_a_jsonb_column(database_url: str, value: Any) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS codec_probe (id serial PRIMARY KEY, v jsonb)")
        row = conn.execute(
            "INSERT INTO codec_probe (v) VALUES (%s::jsonb) RETURNING v", (codec.dumps(value),)
        ).fetchone()
        assert row is not None
        assert equal_with_nan(value, codec.decode(row[0])), (value, row[0])


async def test_surrogate_escaped_text_round_trips_through_jsonb(database_url: str) -> None:
    """`os.fsdecode` turns undecodable file-name bytes into lone surrogates; the codec
    accepts such strings, so they must survive jsonb (which rejects `\\udcff`) or be
    refused by the codec itself with `CodecError`, not by PostgreSQL."""
    name = b"report-\xff.csv".decode("utf-8", "surrogateescape")
    text = codec.dumps(name)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT %s::jsonb AS v", (text,))
        row = await cur.fetchone()
    assert row is not None
    assert codec.decode(row[0]) == name
