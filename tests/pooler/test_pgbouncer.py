"""conveyor through PgBouncer in transaction mode: jobs, workers, locks, migrations.

Between two transactions a transaction-mode pooler may hand a client's next
statement to any server session, and hands the client's last one to other
clients. Everything here runs through a real PgBouncer with fewer server
sessions than clients; the database is read directly only to check results.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from conveyor import App, Config, DatabaseError, JobContext, JobState, Worker, WorkerConfig
from conveyor.bench.pgbouncer import (
    PREPARED_STATEMENTS_SINCE,
    PgBouncer,
    pgbouncer_binary,
    running_pgbouncer,
    version_of,
)
from conveyor.migrations.migrator import available_migrations, migrate
from conveyor.testing import drain
from tests.concurrency.procs import REPO_ROOT, StartWorker, all_in_state, query, wait_until
from tests.concurrency.sample_app import EXECUTIONS_DDL, RECORD, build_app
from tests.pooler.conftest import pooled_config

RUN_TIMEOUT_S = 60.0
"""Bound on any wait for work to finish; generous for a loaded 2-core machine."""


async def test_prepared_statements_through_the_pooler_work_or_fail_naming_the_fix(
    pgbouncer: PgBouncer, server_url: str, database_url: str
) -> None:
    # Two clients prepare different statements under the same psycopg name
    # (`_pg3_0`) through a pooler with one server session. PgBouncer 1.21+ with
    # max_prepared_statements keeps each client's statements apart, so a worker
    # keeps its prepared claims; before 1.21 the second client finds the name
    # taken, and conveyor's error says what to change. Which branch runs
    # depends on the binary (CI: Debian's 1.18; CONVEYOR_PGBOUNCER may name
    # another, as the fifth session did with 1.24.1).
    binary = pgbouncer_binary()
    assert binary is not None  # the `pgbouncer` fixture skipped or failed otherwise
    keeps = version_of(binary) >= PREPARED_STATEMENTS_SINCE
    limit = 100 if keeps else 0
    with running_pgbouncer(server_url, pool_size=1, max_prepared_statements=limit) as bouncer:
        url = bouncer.url(database_url)
        first = App(config=Config(database_url=url, prepare_threshold=0))
        second = App(config=Config(database_url=url, prepare_threshold=0))
        try:
            await first.counts()  # prepared at once, on the only server session
            if not keeps:
                with pytest.raises(DatabaseError, match=r"prepare_threshold=None.*1\.21"):
                    await second.queue_stats()
                return
            for _ in range(3):
                await second.queue_stats()
                await first.counts()

            @first.task(name="square")
            async def square(ctx: JobContext, n: int) -> int:
                return n * n

            await first.enqueue_many(square.job(n=n) for n in range(300))
            jobs = await drain(
                first, WorkerConfig(listen=False, poll_interval=timedelta(milliseconds=50))
            )
            assert [(j.state, j.attempt, j.result) for j in jobs] == [
                (JobState.SUCCEEDED, 1, n * n) for n in range(300)
            ]
        finally:
            await first.close()
            await second.close()


def advisory_locks_held(database_url: str) -> list[tuple[Any, ...]]:
    """Every advisory lock any server session of the database holds, read directly."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        return conn.execute(
            "SELECT pid, classid, objid, objsubid FROM pg_locks WHERE locktype = 'advisory'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchall()


# -- jobs and workers ---------------------------------------------------------


async def test_worker_processes_through_the_pooler_run_every_job_exactly_once(
    pooled_url: str, start_pooled: StartWorker
) -> None:
    app = build_app(pooled_url, pooled=True)
    await query(app, EXECUTIONS_DDL)
    procs = [start_pooled(f"w{i}", concurrency=10, poll_interval=0.05) for i in range(2)]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    record = app.get_task(RECORD)
    ids: list[int] = []
    # Waves enqueued while the workers run: without LISTEN they find work by polling.
    for wave in range(5):
        jobs = await app.enqueue_many(record.job(n=wave * 1000 + i) for i in range(200))
        ids += [job.id for job in jobs]
        await asyncio.sleep(0.05)
    await wait_until(
        lambda: all_in_state(app, ids, "succeeded"), RUN_TIMEOUT_S, "all jobs", procs=procs
    )
    await asyncio.gather(*(p.stop() for p in procs))

    executions = await query(app, "SELECT job_id, pid, worker_id FROM public.executions")
    runs = Counter(row["job_id"] for row in executions)
    assert [job_id for job_id, n in runs.items() if n != 1] == []
    assert set(runs) == set(ids)
    assert {row["pid"] for row in executions} == {p.pid for p in procs}
    done = {job.id: job for job in await app.get_jobs(ids)}
    assert all(done[row["job_id"]].worker_id == row["worker_id"] for row in executions)
    assert sum(p.stats()["succeeded"] for p in procs) == len(ids)
    assert sum(p.stats()["stale_writes"] for p in procs) == 0
    await app.close()


async def test_enqueue_in_the_callers_transaction_through_the_pooler(
    pooled_app: App, pooled_url: str, database_url: str
) -> None:
    @pooled_app.task(name="noted")
    async def noted(ctx: JobContext) -> None: ...

    async with await psycopg.AsyncConnection.connect(pooled_url, prepare_threshold=None) as conn:
        async with conn.transaction(force_rollback=True):
            await noted.configure(connection=conn).enqueue()
        async with conn.transaction():
            kept = await noted.configure(connection=conn).enqueue()
    with psycopg.connect(database_url) as direct:
        assert direct.execute("SELECT id FROM conveyor.jobs").fetchall() == [(kept.id,)]


async def test_a_cancel_and_a_remote_stop_reach_a_pooled_worker_by_its_heartbeat(
    pooled_app: App,
) -> None:
    stopped: list[str | None] = []

    @pooled_app.task(name="endless")
    async def endless(ctx: JobContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            stopped.append(ctx.stop_reason)
            raise

    config = WorkerConfig(
        concurrency=2,
        poll_interval=timedelta(milliseconds=50),
        listen=False,  # a transaction-mode pooler cannot LISTEN
        heartbeat_interval=timedelta(milliseconds=200),
        lease_duration=timedelta(seconds=2),
        shutdown_grace=timedelta(milliseconds=200),
        run_rescuer=False,
    )
    worker = Worker(pooled_app, config)
    await worker.start()
    run = asyncio.create_task(worker.run())
    try:
        cancelled, returned = await endless.enqueue(), await endless.enqueue()

        async def both_running() -> bool:
            jobs = await pooled_app.get_jobs([cancelled.id, returned.id])
            return all(job.state is JobState.RUNNING for job in jobs)

        await wait_until(both_running, RUN_TIMEOUT_S, "both jobs running")
        await pooled_app.cancel(cancelled.id)
        final = await pooled_app.wait(cancelled.id, timeout=RUN_TIMEOUT_S)
        assert final.state is JobState.CANCELLED
        assert await pooled_app.stop_workers(worker.id) == [worker.id]
        await asyncio.wait_for(run, RUN_TIMEOUT_S)
    finally:
        await worker.stop()
        if not run.done():
            run.cancel()
    assert (await pooled_app.get_job(returned.id)).state is JobState.AVAILABLE
    assert sorted(map(str, stopped)) == ["cancel", "shutdown"]


async def test_a_worker_behind_the_pooler_listens_on_its_direct_session_url(
    pooled_url: str, database_url: str
) -> None:
    app = App(config=pooled_config(pooled_url, session_url=database_url))

    @app.task(name="woken")
    async def woken(ctx: JobContext) -> int:
        return 7

    # Polls once a minute: only a NOTIFY can start the job within the wait below.
    config = WorkerConfig(poll_interval=timedelta(minutes=1), run_rescuer=False)
    worker = Worker(app, config)
    await worker.start()
    run = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(worker.connected.wait(), RUN_TIMEOUT_S)
        await worker.wait_until_idle()
        job = await woken.enqueue()  # through the pooler; its NOTIFY reaches the session
        done = await app.wait(job.id, timeout=20)
        assert (done.state, done.result) == (JobState.SUCCEEDED, 7)
    finally:
        worker.request_stop()
        await asyncio.wait_for(run, RUN_TIMEOUT_S)
        await app.close()


# -- locks --------------------------------------------------------------------


async def test_two_holders_of_one_lock_through_the_pooler_exclude_each_other(
    pooled_app: App, database_url: str
) -> None:
    first, second = pooled_app.lock("shared"), pooled_app.lock("shared")
    assert await first.acquire(timeout=0)
    # The holder is idle now; a pooler hands idle server sessions to whoever asks
    # next, so a lock living in a plain session would be re-entered from here.
    for _ in range(10):
        await pooled_app.counts()
        assert not await second.acquire(timeout=0)
    assert await pooled_app.is_locked("shared")
    assert [(info.key, info.pid) for info in await pooled_app.list_locks()] == [
        ("shared", first.pid)
    ]
    await first.release()
    assert await second.acquire(timeout=0)
    await second.release()
    assert advisory_locks_held(database_url) == []


HOLDER = """
import asyncio, os, random, sys
import psycopg
from conveyor import App, Config

async def main() -> None:
    url, key, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    app = App(config=Config(database_url=url, prepare_threshold=None))
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, prepare_threshold=None
    ) as conn:
        for _ in range(rounds):
            async with app.lock(key, timeout=60):
                cur = await conn.execute(
                    "INSERT INTO public.holds (pid, entered) VALUES (%s, clock_timestamp())"
                    " RETURNING id",
                    (os.getpid(),),
                )
                (hold,) = await cur.fetchone()
                await asyncio.sleep(random.random() / 500)
                await conn.execute(
                    "UPDATE public.holds SET left_at = clock_timestamp() WHERE id = %s", (hold,)
                )
    await app.close()

asyncio.run(main())
"""

HOLDS_DDL = """
CREATE TABLE public.holds (
    id bigserial PRIMARY KEY,
    pid integer NOT NULL,
    entered timestamptz NOT NULL,
    left_at timestamptz
)
"""


async def test_lock_holders_in_racing_processes_through_the_pooler_never_overlap(
    pooled_url: str, database_url: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(HOLDS_DDL)
    processes, rounds = 4, 25
    holders = [
        subprocess.Popen(
            [sys.executable, "-c", HOLDER, pooled_url, "one-at-a-time", str(rounds)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(processes)
    ]
    for proc in holders:
        output, _ = await asyncio.to_thread(proc.communicate, timeout=RUN_TIMEOUT_S * 2)
        assert proc.returncode == 0, output.decode(errors="replace")
    with psycopg.connect(database_url) as conn:
        holds = conn.execute(
            "SELECT pid, entered, left_at FROM public.holds ORDER BY entered"
        ).fetchall()
    assert len(holds) == processes * rounds
    assert len({pid for pid, _, _ in holds}) == processes
    overlaps = [
        (before, after) for before, after in itertools.pairwise(holds) if after[1] < before[2]
    ]
    assert overlaps == []
    assert advisory_locks_held(database_url) == []


KILLED_HOLDER = """
import asyncio, sys
from conveyor import App, Config

async def main() -> None:
    app = App(config=Config(database_url=sys.argv[1], prepare_threshold=None))
    lock = app.lock(sys.argv[2])
    assert await lock.acquire(timeout=10)
    print("held", lock.pid, flush=True)
    await asyncio.Event().wait()  # until killed

asyncio.run(main())
"""


async def test_a_holder_killed_behind_the_pooler_frees_its_lock_at_once(
    pooled_app: App, pooled_url: str, database_url: str
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", KILLED_HOLDER, pooled_url, "crashed"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), RUN_TIMEOUT_S)
        assert line.startswith(b"held"), line
        assert not await pooled_app.lock("crashed").acquire(timeout=0)
    finally:
        holder.kill()
        holder.wait()
    # The client died inside the lock's transaction: PgBouncer cannot hand that
    # server connection to anyone, so it closes it, and the lock goes with it.
    successor = pooled_app.lock("crashed")
    assert await successor.acquire(timeout=10)
    assert [pid for pid, *_ in advisory_locks_held(database_url)] == [successor.pid]
    await successor.release()


# -- migrations ---------------------------------------------------------------


@pytest.fixture
def empty_database(server_url: str) -> Iterator[str]:
    """A database with no conveyor schema yet, for this test only."""
    name = f"conveyor_e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield psycopg.conninfo.make_conninfo(server_url, dbname=name)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


async def test_racing_migrators_through_the_pooler_apply_each_migration_once(
    pgbouncer: PgBouncer, empty_database: str
) -> None:
    bounced = pgbouncer.url(empty_database)
    results = await asyncio.wait_for(
        asyncio.gather(*(asyncio.to_thread(migrate, bounced, "conveyor") for _ in range(3))),
        RUN_TIMEOUT_S,
    )
    versions = [m.version for m in available_migrations()]
    assert sorted(v for applied in results for v in applied) == versions
    with psycopg.connect(empty_database) as conn:
        recorded = conn.execute("SELECT version FROM conveyor.schema_migrations ORDER BY 1")
        assert [v for (v,) in recorded.fetchall()] == versions
    # No lock outlived its migrator on a pooled server session: the next one runs.
    assert advisory_locks_held(empty_database) == []
    assert await asyncio.wait_for(asyncio.to_thread(migrate, bounced, "conveyor"), 30) == []
