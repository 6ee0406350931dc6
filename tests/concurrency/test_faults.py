"""Faults around the database: a server restart, a killed control session, a starved pool.

The restart test owns its PostgreSQL server (a private embedded one), so it can
restart it mid-run without disturbing anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conveyor import App, Config, JobContext, Worker, WorkerConfig
from conveyor.migrations.migrator import migrate
from conveyor.testing import advance_time, freeze_time
from tests.concurrency.procs import (
    StartWorker,
    WorkerProcess,
    query,
    rescue_once,
    start_worker,
    state_counts,
    wait_until,
)
from tests.concurrency.sample_app import (
    EXECUTIONS_DDL,
    HOLD,
    QUICK,
    SCHEMA,
    STAMP,
    build_app,
)

T0 = datetime(2031, 3, 1, 9, 0, tzinfo=UTC)
RUN_TIMEOUT_S = 60.0
"""Bound on any wait for jobs or processes; generous for a loaded 2-core machine."""


# -- PostgreSQL restart ------------------------------------------------------------

RESTART_JOBS = 300
RESTART_WORK_S = 0.1
"""Each job's work: 300 jobs on 2 x 5 slots take about 3 s, so both faults land mid-run."""
RESTART_LEASE_S = 3.0
"""Real-time leases here (the clock is not frozen): the outage outlives one."""
FAST_RESTART_AFTER = 40
CRASH_AFTER = 120
"""Jobs done before each fault."""
SERVER_TIMEOUT_S = 60


@dataclass
class PrivateServer:
    """An embedded PostgreSQL server that belongs to one test."""

    url: str
    pgdata: Path
    log: Path
    system_user: str | None

    def restart(self) -> None:
        """A clean restart: stop (fast: open sessions are cut) and start again."""
        self._pg_ctl("-w", "-m", "fast", "-l", str(self.log), "restart")

    def crash(self) -> None:
        """Stop at once, without a checkpoint (the next start runs crash recovery)."""
        self._pg_ctl("-w", "-m", "immediate", "stop")

    def start(self) -> None:
        """Start again on the same socket directory (and no TCP), as pgserver did."""
        socket_dir = psycopg.conninfo.conninfo_to_dict(self.url)["host"]
        self._pg_ctl("-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.log), "start")

    def stop(self) -> None:
        """Stop now; a server already stopped is fine."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("-w", "-m", "immediate", "stop")

    def _pg_ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl(list(args), pgdata=self.pgdata, user=self.system_user, timeout=SERVER_TIMEOUT_S)


@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    """A fresh embedded PostgreSQL server in its own directory, stopped and removed after.

    Under /tmp with a short name: pgserver runs the server as user `pgserver` when
    root, which must reach the directory, and the socket path must stay short.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    base = Path(tempfile.mkdtemp(prefix="cv-restart-", dir="/tmp"))
    private: PrivateServer | None = None
    try:
        server = pgserver.get_server(base / "pgdata", cleanup_mode="stop")  # type: ignore[attr-defined]
        private = PrivateServer(
            url=str(server.get_uri()),
            pgdata=server.pgdata,
            log=server.log,
            system_user=server.system_user,
        )
        yield private
    finally:
        # pgserver's own cleanup would look for the pre-restart postmaster: stop it here.
        if private is not None:
            private.stop()
            if private.log.exists():
                tail = private.log.read_text(errors="replace")[-6_000:]
                print(f"--- private server log:\n{tail}")
        shutil.rmtree(base, ignore_errors=True)


def _tolerant(condition: Callable[[], Awaitable[bool]]) -> Callable[[], Awaitable[bool]]:
    """`condition`, reading "not yet" while the server is down or just back."""

    async def check() -> bool:
        try:
            return await condition()
        except psycopg.Error:
            return False

    return check


async def test_postgres_restarts_mid_run_lose_no_job_and_record_none_twice(
    private_server: PrivateServer, tmp_path: Path
) -> None:
    url = private_server.url
    await asyncio.to_thread(migrate, url, SCHEMA)
    app = build_app(url)
    procs: list[WorkerProcess] = []
    loop = asyncio.get_running_loop()
    try:
        await query(app, EXECUTIONS_DDL)
        # Short leases and rescues so the attempts the faults break come back within seconds.
        procs = [
            start_worker(
                url,
                tmp_path / "workers",
                f"w{i}",
                concurrency=5,
                poll_interval=0.2,
                lease_duration=RESTART_LEASE_S,
                heartbeat_interval=0.5,
                rescue_interval=0.5,
            )
            for i in range(2)
        ]
        await asyncio.gather(*(p.wait_ready() for p in procs))
        stamp = app.get_task(STAMP)
        jobs = await app.enqueue_many(
            stamp.job(n=i, work_s=RESTART_WORK_S) for i in range(RESTART_JOBS)
        )
        ids = [j.id for j in jobs]

        async def succeeded() -> int:
            return (await state_counts(app, ids)).get("succeeded", 0)

        async def done_at_least(count: int) -> bool:
            return await succeeded() >= count

        first_start = await _postmaster_start(app)

        # 1. A clean restart: every session is cut, the server is back at once.
        await wait_until(
            _tolerant(lambda: done_at_least(FAST_RESTART_AFTER)),
            RUN_TIMEOUT_S,
            f"{FAST_RESTART_AFTER} jobs done",
            procs=procs,
        )
        assert await succeeded() < len(ids), "every job finished before the restart"
        await asyncio.to_thread(private_server.restart)

        # 2. A crash, and an outage longer than a lease: running attempts are abandoned,
        # finished ones wait to be written, and the leases expire meanwhile.
        await wait_until(
            _tolerant(lambda: done_at_least(CRASH_AFTER)),
            RUN_TIMEOUT_S,
            f"{CRASH_AFTER} jobs done",
            procs=procs,
        )
        assert await succeeded() < len(ids), "every job finished before the crash"
        await asyncio.to_thread(private_server.crash)
        down_since = loop.time()

        async def outage_outlived_a_lease() -> bool:
            return loop.time() - down_since > RESTART_LEASE_S + 1

        # The scenario, not a synchronisation: keep the server down past a lease.
        await wait_until(outage_outlived_a_lease, RUN_TIMEOUT_S, "the outage", procs=procs)
        await asyncio.to_thread(private_server.start)

        async def all_done() -> bool:
            return await succeeded() == len(ids)

        await wait_until(_tolerant(all_done), RUN_TIMEOUT_S, "all jobs succeeded", procs=procs)
        assert await _postmaster_start(app) > first_start, "the server did not restart"
        await asyncio.gather(*(p.stop() for p in procs))
        done = await app.get_jobs(ids)
        ran = await query(app, "SELECT job_id, attempt, worker_id FROM public.executions")
    finally:
        for proc in procs:
            proc.kill()
            print(f"--- worker {proc.name} (exit {proc.popen.returncode}):\n{proc.log()}")
        await app.close()

    # Every job ended once, recorded by the attempt that held its lease at the end.
    assert {j.state for j in done} == {"succeeded"}
    assert [j.id for j in done if j.result["n"] != j.args["n"]] == []
    assert [
        j.id for j in done if (j.result["attempt"], j.result["worker"]) != (j.attempt, j.worker_id)
    ] == []
    # An attempt that did not succeed left exactly one error (its failure or its rescue).
    assert [j.id for j in done if len(j.errors) != j.attempt - 1] == []
    # The recorded attempt ran exactly once; earlier, broken attempts may have run too.
    runs = Counter((r["job_id"], r["attempt"], r["worker_id"]) for r in ran)
    assert [j.id for j in done if runs[(j.id, j.attempt, j.worker_id)] != 1] == []
    assert {r["job_id"] for r in ran} == set(ids)
    stats = [p.stats() for p in procs]
    print(
        "attempts:", Counter(j.attempt for j in done),
        "errors:", Counter(e["type"] for j in done for e in j.errors),
        "executions:", len(ran),
        "stats:", stats,
    )  # fmt: skip
    assert sum(s["succeeded"] for s in stats) >= len(ids)


async def _postmaster_start(app: App) -> datetime:
    rows = await query(app, "SELECT pg_postmaster_start_time() AS at")
    started: datetime = rows[0]["at"]
    return started


# -- the control session killed by the server -------------------------------------------

CONTROL_LEASE = timedelta(seconds=30)
NOTIFY_TIMEOUT_S = 10.0
"""A third of the worker's 30 s poll: a job that starts within it was not found by polling."""


async def _control_pids(app: App) -> set[int]:
    rows = await query(
        app,
        "SELECT pid FROM pg_stat_activity"
        " WHERE application_name = 'conveyor-control' AND datname = current_database()",
    )
    return {row["pid"] for row in rows}


async def test_a_killed_control_connection_reconnects_catches_up_and_heartbeats_again(
    sample_app: App, start: StartWorker, tmp_path: Path
) -> None:
    await freeze_time(sample_app, T0)
    gate = tmp_path / "gate-open"
    held = await sample_app.get_task(HOLD).enqueue(gate=str(gate), timeout_s=RUN_TIMEOUT_S)
    proc = start(
        "listener",
        concurrency=3,
        poll_interval=30.0,
        lease_duration=CONTROL_LEASE.total_seconds(),
        heartbeat_interval=0.5,
    )
    await proc.wait_ready()
    await wait_until(
        lambda: _job_state_is(sample_app, held.id, "running"),
        RUN_TIMEOUT_S,
        "held job running",
        procs=[proc],
    )
    token = (await sample_app.get_job(held.id)).lease_token
    quick = sample_app.get_task(QUICK)
    seen = await _control_pids(sample_app)
    assert len(seen) == 1

    for round_ in range(2):
        (old,) = await _control_pids(sample_app)
        await query(sample_app, "SELECT pg_terminate_backend(%s)", [old])
        # Enqueued at once: its NOTIFY may reach no listener. The catch-up claim made on
        # reconnecting must find it, long before the 30 s poll would.
        lost = await quick.enqueue(n=round_)
        assert (await sample_app.wait(lost.id, timeout=NOTIFY_TIMEOUT_S)).state == "succeeded"

        async def reconnected(known: frozenset[int] = frozenset(seen)) -> bool:
            return bool(await _control_pids(sample_app) - known)

        await wait_until(reconnected, RUN_TIMEOUT_S, "a new control session", procs=[proc])
        seen |= await _control_pids(sample_app)
        # Listening again: a NOTIFY alone wakes the idle producer.
        woken = await quick.enqueue(n=100 + round_)
        assert (await sample_app.wait(woken.id, timeout=NOTIFY_TIMEOUT_S)).state == "succeeded"
        # Heartbeating again on the new session: the held job's lease follows the clock.
        now = await advance_time(sample_app, CONTROL_LEASE / 2)

        async def renewed(at: datetime = now) -> bool:
            job = await sample_app.get_job(held.id)
            return job.lease_expires_at == at + CONTROL_LEASE

        await wait_until(renewed, RUN_TIMEOUT_S, "the lease renewed", procs=[proc])
        assert (await rescue_once(sample_app)).rescued == {}
        assert (await sample_app.get_job(held.id)).lease_token == token

    gate.touch()
    done = await sample_app.wait(held.id, timeout=RUN_TIMEOUT_S)
    assert (done.state, done.attempt, done.worker_id) == ("succeeded", 1, proc.info["id"])
    assert done.errors == []
    proc.check_alive()
    await proc.stop()
    stats = proc.stats()
    assert (stats["succeeded"], stats["lease_lost"], stats["stale_writes"]) == (5, 0, 0)


async def _job_state_is(app: App, job_id: int, state: str) -> bool:
    return (await app.get_job(job_id)).state == state


# -- heartbeats with a starved pool ---------------------------------------------------------

LOAD_JOBS = 60
LOAD_CONCURRENCY = 50
LOAD_HOLD_S = 0.05
"""Each job holds the one pooled connection this long per turn: a statement waiting
for the pool queues behind 50 of them, 2.5 s, longer than a lease."""
LOAD_LEASE = timedelta(seconds=2)
LOAD_STEP = timedelta(milliseconds=1500)
"""Less than a lease: between two steps one heartbeat must have renewed every lease."""
LOAD_STEPS = 5
"""7.5 s of database time, almost four leases' worth: survived only by renewing."""


async def test_heartbeats_keep_fifty_leases_alive_through_a_one_connection_pool_under_load(
    database_url: str,
) -> None:
    # The worker's App has ONE pooled connection, and 50 jobs queue for it, each holding
    # it in a transaction. A heartbeat that waited for the pool would come seconds late
    # and lose every lease (the watchdog's real-time one, then the database's); it runs
    # on the control session's own connection, so it is never starved.
    busy_app = App(config=Config(database_url=database_url, schema=SCHEMA, pool_size=1))
    admin = App(database_url, schema=SCHEMA)
    release = asyncio.Event()
    reads = Counter[int]()

    @busy_app.task(name="load.busy")
    async def busy(ctx: JobContext) -> int:
        while not release.is_set():
            async with ctx.app.db.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_sleep(%s)", [LOAD_HOLD_S])
                await conn.execute("SELECT state FROM conveyor.jobs WHERE id = %s", [ctx.job.id])
            reads[ctx.job.id] += 1
        return reads[ctx.job.id]

    await freeze_time(admin, T0)
    jobs = await busy_app.enqueue_many(busy.job() for _ in range(LOAD_JOBS))
    ids = [j.id for j in jobs]
    worker = Worker(
        busy_app,
        WorkerConfig(
            concurrency=LOAD_CONCURRENCY,
            lease_duration=LOAD_LEASE,
            heartbeat_interval=timedelta(milliseconds=200),
            rescue_interval=timedelta(milliseconds=500),
            poll_interval=timedelta(milliseconds=50),
        ),
    )
    await worker.start()
    try:

        async def running_tokens() -> dict[int, Any]:
            rows = await query(
                admin,
                "SELECT id, lease_token FROM conveyor.jobs WHERE state = 'running' ORDER BY id",
            )
            return {row["id"]: row["lease_token"] for row in rows}

        async def all_slots_busy() -> bool:
            tokens = await running_tokens()
            return len(tokens) == LOAD_CONCURRENCY and sum(reads.values()) > 0

        await wait_until(all_slots_busy, RUN_TIMEOUT_S, f"{LOAD_CONCURRENCY} jobs busy")
        tokens = await running_tokens()
        for _ in range(LOAD_STEPS):
            reads_before = sum(reads.values())
            now = await advance_time(admin, LOAD_STEP)
            assert (await rescue_once(admin)).rescued == {}

            async def renewed_under_load(at: datetime = now, before: int = reads_before) -> bool:
                rows = await query(
                    admin,
                    "SELECT count(*) AS stale FROM conveyor.jobs"
                    " WHERE state = 'running' AND lease_expires_at <> %s",
                    [at + LOAD_LEASE],
                )
                return rows[0]["stale"] == 0 and sum(reads.values()) > before

            await wait_until(renewed_under_load, RUN_TIMEOUT_S, "every lease renewed")
            assert await running_tokens() == tokens
        release.set()
        await wait_until(
            lambda: _all_succeeded(admin, ids), RUN_TIMEOUT_S, "all busy jobs succeeded"
        )
    finally:
        release.set()
        await worker.stop()
        await busy_app.close()

    try:
        done = await admin.get_jobs(ids)
    finally:
        await admin.close()
    assert {(j.state, j.attempt) for j in done} == {("succeeded", 1)}
    assert [j.id for j in done if j.errors] == []
    stats = worker.stats
    assert (stats.succeeded, stats.lease_lost, stats.stale_writes) == (LOAD_JOBS, 0, 0)


async def _all_succeeded(app: App, ids: list[int]) -> bool:
    return (await state_counts(app, ids)).get("succeeded", 0) == len(ids)
