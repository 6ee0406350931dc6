"""Execution windows on a real PostgreSQL and the fake database clock: the SQL
functions agree with `ExecutionWindow` (DST included), and enqueue, retry, claim,
the rescuer and concurrency keys all honour the window. No test sleeps for time:
the clock is frozen and moved."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import psycopg
import pytest

from conveyor import (
    App,
    InvalidJobOptions,
    Job,
    JobContext,
    JobState,
    Retry,
    Worker,
    WorkerConfig,
)
from conveyor.maintenance.rescuer import Rescuer
from conveyor.testing import advance_time, database_now, drain, freeze_time
from conveyor.windows import ExecutionWindow
from tests.integration.conftest import CountJobs, QueryDb
from tests.unit.test_windows import DST_EDGE_WINDOWS, FALL_BACK_DAYS, wrong_openings

OSLO = ZoneInfo("Europe/Oslo")
OFFICE = "09:00-17:00 Europe/Oslo"
POLL = timedelta(milliseconds=20)


def oslo(day: int, hour: int, minute: int = 0, second: int = 0, month: int = 6) -> datetime:
    """A local time in Oslo in 2026 (June: summer time, UTC+2)."""
    return datetime(2026, month, day, hour, minute, second, tzinfo=OSLO)


def worker_config(concurrency: int = 2) -> WorkerConfig:
    return WorkerConfig(
        concurrency=concurrency, poll_interval=POLL, shutdown_grace=timedelta(seconds=1)
    )


async def claim(app: App, limit: int = 10) -> list[Job]:
    """Claim due jobs as a worker that never runs them."""
    rows = await app.db.fetch(
        "claim",
        "job_claim_many",
        {"queues": ["default"], "limit": limit, "worker_id": "w", "lease_s": 30.0},
    )
    return sorted((Job.from_row(r) for r in rows), key=lambda j: j.id)


def rescuer_of(app: App) -> Rescuer:
    return Worker(app, WorkerConfig(run_rescuer=False)).rescuer


# -- the SQL functions mirror ExecutionWindow -----------------------------------------

ZONES = ("Europe/Oslo", "America/New_York", "UTC")
SPANS = ((time(9), time(17)), (time(22), time(6)), (time(0), time(1)))
GRID_DAYS = (
    date(2026, 3, 7),  # New York springs forward on 03-08
    date(2026, 3, 28),  # Oslo springs forward on 03-29
    date(2026, 6, 15),  # an ordinary summer day
    date(2026, 10, 24),  # Oslo falls back on 10-25
    date(2026, 10, 31),  # New York falls back on 11-01
)
"""Each entry starts a run of three UTC days: the day before, of and after a change."""
STEP = timedelta(minutes=15)
TINY = timedelta(microseconds=1)


def grid(days: Iterable[date], span_days: int = 3, step: timedelta = STEP) -> list[datetime]:
    """Instants every `step` over `span_days` UTC days from each day, each also 1 µs
    earlier (just before a boundary: the end is exclusive, the start inclusive)."""
    instants: list[datetime] = []
    for first in days:
        at = datetime.combine(first, time(0), tzinfo=UTC)
        while at < datetime.combine(first + timedelta(days=span_days), time(0), tzinfo=UTC):
            instants += [at, at - TINY]
            at += step
    return instants


async def sql_windows(
    database_url: str, instants: Sequence[datetime], windows: Sequence[ExecutionWindow]
) -> dict[tuple[int, int], tuple[bool, datetime]]:
    """(instant index, window index) -> (in_window, window_next_open), in one statement.

    The session zone is deliberately odd (UTC+05:45): the functions must not depend on it.
    """
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("SET TIME ZONE 'Asia/Kathmandu'")
        cur = await conn.execute(
            """
            SELECT a.i, w.j,
                   conveyor.in_window(a.at, w.s, w.e, w.tz),
                   conveyor.window_next_open(a.at, w.s, w.e, w.tz)
            FROM unnest(%s::timestamptz[]) WITH ORDINALITY AS a(at, i)
            CROSS JOIN unnest(%s::time[], %s::time[], %s::text[]) WITH ORDINALITY AS w(s, e, tz, j)
            """,
            (
                list(instants),
                [w.start for w in windows],
                [w.end for w in windows],
                [w.tz for w in windows],
            ),
        )
        rows = await cur.fetchall()
    return {(int(i) - 1, int(j) - 1): (inside, opens) for i, j, inside, opens in rows}


def disagreements(
    instants: Sequence[datetime],
    windows: Sequence[ExecutionWindow],
    from_sql: dict[tuple[int, int], tuple[bool, datetime]],
) -> list[str]:
    found = []
    for (i, j), (sql_inside, sql_opens) in sorted(from_sql.items()):
        window, at = windows[j], instants[i]
        py_inside, py_opens = window.contains(at), window.next_open(at)
        # Aware datetimes compare as instants, whatever their zone.
        if (sql_inside, sql_opens) != (py_inside, py_opens):
            found.append(
                f"{window} at {at.isoformat()}: SQL ({sql_inside}, {sql_opens.astimezone(UTC)})"
                f" != Python ({py_inside}, {py_opens.astimezone(UTC)})"
            )
    return found


async def test_sql_functions_agree_with_python_across_dst_changes(database_url: str) -> None:
    windows = [ExecutionWindow(start, end, zone) for zone in ZONES for start, end in SPANS]
    instants = grid(GRID_DAYS)
    from_sql = await sql_windows(database_url, instants, windows)
    assert len(from_sql) == len(instants) * len(windows)
    assert disagreements(instants, windows, from_sql) == []
    # The grid sees both open and closed windows.
    results = {inside for inside, _ in from_sql.values()}
    assert results == {True, False}


@pytest.mark.parametrize(
    ("at", "opens"),
    [
        (datetime(2026, 3, 28, 0, 0, tzinfo=UTC), datetime(2026, 3, 28, 8, 0, tzinfo=UTC)),
        (datetime(2026, 3, 30, 0, 0, tzinfo=UTC), datetime(2026, 3, 30, 7, 0, tzinfo=UTC)),
        (datetime(2026, 10, 24, 0, 0, tzinfo=UTC), datetime(2026, 10, 24, 7, 0, tzinfo=UTC)),
        (datetime(2026, 10, 26, 0, 0, tzinfo=UTC), datetime(2026, 10, 26, 8, 0, tzinfo=UTC)),
    ],
)
async def test_sql_opening_follows_oslo_dst(
    database_url: str, at: datetime, opens: datetime
) -> None:
    window = ExecutionWindow.parse(OFFICE)
    ((inside, sql_opens),) = (await sql_windows(database_url, [at], [window])).values()
    assert (inside, sql_opens) == (False, opens)


async def test_sql_functions_treat_no_window_as_always_open(query_db: QueryDb) -> None:
    at = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)
    (row,) = await query_db(
        "SELECT conveyor.in_window(%s, NULL, NULL, NULL) AS inside,"
        " conveyor.window_next_open(%s, NULL, NULL, NULL) AS opens",
        at,
        at,
    )
    assert row == {"inside": True, "opens": at}


def fall_back_instants() -> list[tuple[date, datetime]]:
    """Every 5 minutes over the two UTC days from each fall-back eve."""
    return [
        (day, datetime.combine(day, time(0), tzinfo=UTC) + n * timedelta(minutes=5))
        for day in FALL_BACK_DAYS
        for n in range(2 * 24 * 12)
    ]


async def test_sql_next_open_is_the_first_opening_when_the_start_time_repeats(
    database_url: str,
) -> None:
    """Same rule for `window_next_open`: a job enqueued just before the first 02:30 of
    the Oslo fall-back night must be due at that 02:30 (00:30 UTC), when `in_window`
    already lets it be claimed."""
    pairs = fall_back_instants()
    instants = [at for _, at in pairs]
    from_sql = await sql_windows(database_url, instants, DST_EDGE_WINDOWS)
    wrong = []
    for j, window in enumerate(DST_EDGE_WINDOWS):
        for day in FALL_BACK_DAYS:
            answers = {at: from_sql[(i, j)][1] for i, (d, at) in enumerate(pairs) if d == day}
            wrong += wrong_openings(window, day, answers)
    assert not wrong, f"{len(wrong)} wrong openings, e.g.:\n" + "\n".join(wrong[::60])


async def test_sql_and_python_agree_when_the_start_time_is_skipped(database_url: str) -> None:
    """Spring forward: both open the window at the clock change when the start is skipped."""
    windows = DST_EDGE_WINDOWS
    instants = grid([date(2026, 3, 7), date(2026, 3, 28)], step=timedelta(minutes=5))
    from_sql = await sql_windows(database_url, instants, windows)
    assert disagreements(instants, windows, from_sql) == []
    # 02:30 does not exist in Oslo on 03-29: the clock jumps to 03:00 (01:00 UTC), in the window.
    at = datetime(2026, 3, 29, 0, 0, tzinfo=UTC)
    assert windows[0].next_open(at) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)


# -- enqueue ---------------------------------------------------------------------------


async def test_job_enqueued_before_the_window_waits_for_the_opening(app: App) -> None:
    ran: list[datetime] = []

    @app.task(name="office", window=OFFICE)
    async def office(ctx: JobContext) -> None:
        ran.append(await database_now(app))

    await freeze_time(app, oslo(15, 7))
    job = await office.enqueue()
    assert job.state is JobState.SCHEDULED
    assert job.run_at == oslo(15, 9)
    assert (job.window_start, job.window_end, job.window_tz) == (time(9), time(17), "Europe/Oslo")

    (still,) = await drain(app, worker_config())
    assert ran == []
    assert (still.state, still.attempt, still.run_at) == (JobState.SCHEDULED, 0, oslo(15, 9))

    # One second before the opening: still nothing.
    await advance_time(app, timedelta(hours=2) - timedelta(seconds=1))
    await drain(app, worker_config())
    assert ran == []

    await advance_time(app, timedelta(seconds=1))
    (done,) = await drain(app, worker_config())
    assert done.state is JobState.SUCCEEDED
    assert ran == [oslo(15, 9)]
    assert done.started_at == oslo(15, 9)


async def test_window_across_midnight(app: App) -> None:
    ran: list[int] = []

    @app.task(name="nightly", window="22:00-06:00")
    async def nightly(ctx: JobContext, n: int) -> None:
        ran.append(n)

    noon = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
    await freeze_time(app, noon)
    waiting = await nightly.enqueue(n=1)
    assert waiting.state is JobState.SCHEDULED
    assert waiting.run_at == noon.replace(hour=22)
    await drain(app, worker_config())
    assert ran == []

    await advance_time(app, timedelta(hours=10) - timedelta(seconds=1))  # 21:59:59
    await drain(app, worker_config())
    assert ran == []
    await advance_time(app, timedelta(seconds=1))  # 22:00
    await drain(app, worker_config())
    assert ran == [1]

    late = noon.replace(hour=23, minute=30)
    await freeze_time(app, late)
    at_once = await nightly.enqueue(n=2)
    assert (at_once.state, at_once.run_at) == (JobState.AVAILABLE, late)
    await drain(app, worker_config())
    assert ran == [1, 2]

    # Past midnight, before 06:00, still inside.
    await freeze_time(app, datetime(2026, 6, 16, 5, 59, tzinfo=UTC))
    after_midnight = await nightly.enqueue(n=3)
    assert after_midnight.state is JobState.AVAILABLE
    await drain(app, worker_config())
    assert ran == [1, 2, 3]

    # 06:00 is outside again: the job waits for 22:00 the same day.
    await freeze_time(app, datetime(2026, 6, 16, 6, 0, tzinfo=UTC))
    morning = await nightly.enqueue(n=4)
    assert (morning.state, morning.run_at) == (
        JobState.SCHEDULED,
        datetime(2026, 6, 16, 22, 0, tzinfo=UTC),
    )


async def test_delay_run_at_and_per_enqueue_windows_at_enqueue(app: App) -> None:
    @app.task(name="office", window=OFFICE)
    async def office(ctx: JobContext) -> None: ...

    await freeze_time(app, oslo(15, 16, 30))
    # A delay that ends after closing time: the next morning.
    delayed = await office.configure(delay=timedelta(hours=1)).enqueue()
    assert (delayed.state, delayed.run_at) == (JobState.SCHEDULED, oslo(16, 9))
    # A delay that ends inside: kept.
    short = await office.configure(delay=timedelta(minutes=10)).enqueue()
    assert (short.state, short.run_at) == (JobState.SCHEDULED, oslo(15, 16, 40))
    # An explicit run_at on a Saturday evening: the next opening after it.
    explicit = await office.configure(run_at=oslo(20, 20)).enqueue()
    assert explicit.run_at == oslo(21, 9)
    # A per-enqueue window replaces the task's.
    evening = await office.configure(window="18:00-20:00 Europe/Oslo").enqueue()
    assert (evening.state, evening.run_at) == (JobState.SCHEDULED, oslo(15, 18))
    assert (evening.window_start, evening.window_end) == (time(18), time(20))
    # And window=None lifts it.
    anytime = await office.configure(window=None).enqueue()
    assert (anytime.state, anytime.run_at, anytime.window_tz) == (
        JobState.AVAILABLE,
        oslo(15, 16, 30),
        None,
    )
    # The rows say the same as the returned jobs.
    stored = await app.get_jobs([j.id for j in (delayed, short, explicit, evening, anytime)])
    assert [j.run_at for j in stored] == [
        oslo(16, 9),
        oslo(15, 16, 40),
        oslo(21, 9),
        oslo(15, 18),
        oslo(15, 16, 30),
    ]


async def test_bad_per_enqueue_window_writes_nothing(app: App, count_jobs: CountJobs) -> None:
    @app.task(name="office", window=OFFICE)
    async def office(ctx: JobContext) -> None: ...

    for bad in ("25:00-17:00", "09:60-10:00", "09:00-09:00", "09:00-17:00 Mars/Base", "x", 5):
        with pytest.raises(InvalidJobOptions):
            await office.configure(window=bad).enqueue()
        with pytest.raises(InvalidJobOptions):
            await app.enqueue_many([office.job(), office.configure(window=bad).job()])
    assert await count_jobs() == 0


# -- retry -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failed_at", "retry_at"),
    [
        # 30 s after 16:59:50 is 17:00:20, outside: the next morning.
        (oslo(15, 16, 59, 50), oslo(16, 9)),
        # 30 s after 16:59:00 is still inside: the plain delay.
        (oslo(15, 16, 59, 0), oslo(15, 16, 59, 30)),
        # On Friday evening, a retry lands on Saturday morning (windows are daily).
        (oslo(19, 16, 59, 59), oslo(20, 9)),
    ],
)
async def test_retry_outside_the_window_waits_for_the_next_opening(
    app: App, failed_at: datetime, retry_at: datetime
) -> None:
    attempts: list[int] = []

    @app.task(name="call", window=OFFICE, max_attempts=3)
    async def call(ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise Retry(delay=timedelta(seconds=30))

    await freeze_time(app, failed_at)
    job = await call.enqueue()
    assert job.state is JobState.AVAILABLE

    (retrying,) = await drain(app, worker_config())
    assert attempts == [1]
    assert retrying.state is JobState.SCHEDULED
    assert retrying.run_at == retry_at
    assert retrying.attempt == 1
    assert len(retrying.errors) == 1

    await freeze_time(app, retry_at - timedelta(seconds=1))
    await drain(app, worker_config())
    assert attempts == [1]
    await advance_time(app, timedelta(seconds=1))
    (done,) = await drain(app, worker_config())
    assert attempts == [1, 2]
    assert (done.state, done.attempt, done.started_at) == (JobState.SUCCEEDED, 2, retry_at)


# -- claim and the rescuer ----------------------------------------------------------------


async def test_due_job_whose_window_closed_is_not_claimed_and_is_moved_by_the_rescuer(
    app: App,
) -> None:
    ran: list[datetime] = []

    @app.task(name="office", window=OFFICE)
    async def office(ctx: JobContext) -> None:
        ran.append(await database_now(app))

    @app.task(name="plain", queue="other")
    async def plain(ctx: JobContext) -> None: ...

    await freeze_time(app, oslo(15, 16, 59))
    late = await office.enqueue()
    assert (late.state, late.run_at) == (JobState.AVAILABLE, oslo(15, 16, 59))
    # Bystanders in another queue: one without a window, one whose window is open.
    bystanders = [
        await plain.enqueue(),
        await plain.configure(window="16:00-18:00 Europe/Oslo").enqueue(),
    ]

    await advance_time(app, timedelta(minutes=1))  # 17:00: closed
    assert await claim(app) == []
    assert (await app.get_job(late.id)).state is JobState.AVAILABLE

    report = await rescuer_of(app).run_once()
    assert report.ran
    assert report.rescued == {}  # not a lease rescue
    moved = await app.get_job(late.id)
    assert (moved.state, moved.run_at, moved.attempt) == (JobState.SCHEDULED, oslo(16, 9), 0)
    assert moved.errors == []
    for before, after in zip(
        bystanders, await app.get_jobs([b.id for b in bystanders]), strict=True
    ):
        assert (after.state, after.run_at) == (before.state, before.run_at)

    # A second pass changes nothing; claims still find nothing.
    await rescuer_of(app).run_once()
    again = await app.get_job(late.id)
    assert (again.state, again.run_at) == (JobState.SCHEDULED, oslo(16, 9))
    assert await claim(app) == []

    # The drain does not run it overnight, and does run it at the opening.
    await freeze_time(app, oslo(16, 8, 59, 59))
    await drain(app, worker_config())
    assert ran == []
    await advance_time(app, timedelta(seconds=1))
    (done,) = await drain(app, worker_config())
    assert done.state is JobState.SUCCEEDED
    assert ran == [oslo(16, 9)]


# -- concurrency keys ---------------------------------------------------------------------


async def test_keyed_windowed_jobs_wait_outside_and_keep_fifo_inside(app: App) -> None:
    started: list[int] = []
    running = 0
    peak = 0

    @app.task(name="serial", concurrency_limit=1, window=OFFICE)
    async def serial(ctx: JobContext, n: int) -> None:
        nonlocal running, peak
        started.append(n)
        running += 1
        peak = max(peak, running)
        try:
            for _ in range(3):  # yield, so a wrongly started second job would overlap
                await asyncio.sleep(0)
        finally:
            running -= 1

    await freeze_time(app, oslo(15, 7))
    jobs = await app.enqueue_many([serial.job(n=n) for n in range(5)])
    assert {(j.state, j.run_at, j.concurrency_key) for j in jobs} == {
        (JobState.SCHEDULED, oslo(15, 9), "serial")
    }

    await drain(app, worker_config(concurrency=3))
    assert started == []
    (stats,) = await app.keys()
    assert (stats.waiting, stats.running) == (5, 0)

    await advance_time(app, timedelta(hours=2))  # 09:00
    done = await drain(app, worker_config(concurrency=3))
    assert [j.state for j in done] == [JobState.SUCCEEDED] * 5
    assert started == [0, 1, 2, 3, 4]
    assert peak == 1
    assert {j.started_at for j in done} == {oslo(15, 9)}
    (stats,) = await app.keys()
    assert (stats.waiting, stats.running, stats.total_succeeded) == (0, 0, 5)


async def test_keyed_due_jobs_whose_window_closed_are_not_claimed(app: App) -> None:
    @app.task(name="serial", concurrency_limit=1, window=OFFICE)
    async def serial(ctx: JobContext, n: int) -> None: ...

    await freeze_time(app, oslo(15, 16, 59))
    jobs = await app.enqueue_many([serial.job(n=n) for n in range(3)])
    assert {j.state for j in jobs} == {JobState.AVAILABLE}
    await advance_time(app, timedelta(minutes=1))
    assert await claim(app) == []

    await rescuer_of(app).run_once()
    moved = await app.get_jobs([j.id for j in jobs])
    assert {(j.state, j.run_at) for j in moved} == {(JobState.SCHEDULED, oslo(16, 9))}
    (stats,) = await app.keys()
    assert (stats.waiting, stats.running) == (3, 0)

    await freeze_time(app, oslo(16, 9))
    # The head of the key, and only it: the limit is 1.
    assert [j.id for j in await claim(app)] == [jobs[0].id]
    assert await claim(app) == []


async def test_keys_waiting_for_their_window_do_not_starve_a_due_key(app: App) -> None:
    """Keys whose jobs all wait for a window are not due; a key with a due job must
    still be claimed, however many such keys were created before it."""

    @app.task(name="office", concurrency_limit=1, concurrency_key="acct:{n}", window=OFFICE)
    async def office(ctx: JobContext, n: int) -> None: ...

    @app.task(name="urgent", concurrency_limit=1)
    async def urgent(ctx: JobContext) -> None: ...

    await freeze_time(app, oslo(15, 7))
    await app.enqueue_many([office.job(n=n) for n in range(12)])
    due = await urgent.enqueue()
    assert due.state is JobState.AVAILABLE
    assert [j.id for j in await claim(app, limit=10)] == [due.id]
