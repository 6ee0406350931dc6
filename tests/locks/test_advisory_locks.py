"""PostgreSQL advisory locks: what only this backend promises.

Proves that a session lock dies with its connection (close or backend kill),
that separate OS processes exclude each other, how keys map to advisory ids
(the documented SHA-256 formula, two-integer keys in their own key space,
invalid keys refused), what `is_locked`, `list_locks` and `conveyor locks`
report (including locks taken outside conveyor and waiters), that
transaction-level locks end at commit and rollback and time out without
breaking the transaction, that a timed wait longer than PostgreSQL's
`lock_timeout` can express still waits, and that `JobContext.lock` works
inside a task.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from typer.testing import CliRunner

from conveyor import App, Config, JobContext
from conveyor.cli.main import cli
from conveyor.errors import LockError, LockLost
from conveyor.jobs import JobState
from conveyor.locks import AdvisoryLock, LockInfo, advisory_id
from conveyor.testing import drain
from tests.locks.conftest import AdvisoryFactory, execute

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture
async def raw_conn(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A plain autocommit session on the test database, not through conveyor."""
    conn = await psycopg.AsyncConnection.connect(
        database_url, autocommit=True, application_name="raw-client"
    )
    yield conn
    await conn.close()


async def advisory_rows(url: str, pid: int | None) -> list[tuple[Any, ...]]:
    """(classid, objid, objsubid, granted) of the advisory locks of one backend."""
    return await execute(
        url,
        "SELECT classid::bigint, objid::bigint, objsubid::int, granted FROM pg_locks"
        " WHERE locktype = 'advisory' AND pid = %s ORDER BY objsubid, classid, objid",
        (pid,),
    )


# -- the session is the lock ------------------------------------------------


async def test_closing_the_lock_connection_releases_the_lock(
    advisory_lock: AdvisoryFactory,
) -> None:
    lock, other = advisory_lock("closed"), advisory_lock("closed")
    assert await lock.acquire(timeout=0)
    await lock.close()
    assert not lock.held
    assert await other.acquire(timeout=0)
    await other.release()


async def test_killing_the_backend_releases_the_lock_and_the_holder_learns_it_is_lost(
    advisory_lock: AdvisoryFactory, database_url: str, app: App
) -> None:
    lock, other = advisory_lock("killed"), advisory_lock("killed")
    assert await lock.acquire(timeout=0)
    assert await execute(database_url, "SELECT pg_terminate_backend(%s)", (lock.pid,)) == [(True,)]
    # pg_terminate_backend only signals; the lock goes when the backend has exited.
    assert await other.acquire(timeout=2)
    with pytest.raises(LockLost):
        await lock.extend()
    assert lock.lost
    assert not lock.held
    with pytest.raises(LockLost):
        await lock.release()
    listed = await app.list_locks()
    assert [(info.key, info.owner, info.pid) for info in listed] == [
        ("killed", other.owner, other.pid)
    ]
    await other.release()


async def test_release_after_the_backend_was_killed_raises_lock_lost(
    advisory_lock: AdvisoryFactory, database_url: str
) -> None:
    lock = advisory_lock("killed-then-released")
    assert await lock.acquire(timeout=0)
    await execute(database_url, "SELECT pg_terminate_backend(%s)", (lock.pid,))
    with pytest.raises(LockLost):
        await lock.release()
    assert not lock.held


CONTENDER = """
import asyncio, sys
from conveyor import App

async def main() -> None:
    app = App(sys.argv[1], schema="conveyor")
    lock = app.lock(sys.argv[2])
    try:
        acquired = await lock.acquire(timeout=0)
        print(acquired, flush=True)
        if acquired:
            await asyncio.to_thread(sys.stdin.readline)  # hold until told to exit
            await lock.release()
    finally:
        await app.close()

asyncio.run(main())
"""


async def test_three_os_processes_contending_for_one_key_exactly_one_acquires(
    database_url: str,
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CONTENDER,
            database_url,
            "cross-process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        for _ in range(3)
    ]
    try:
        results = []
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            results.append(line.decode().strip())
        assert sorted(results) == ["False", "False", "True"]
    finally:
        # Tell the holder to exit (the others have already); reap all three.
        for proc in procs:
            await asyncio.wait_for(proc.communicate(b"exit\n"), timeout=30)
    assert [proc.returncode for proc in procs] == [0, 0, 0]


# -- keys -------------------------------------------------------------------


def test_advisory_id_of_a_string_is_the_first_8_bytes_of_sha256_as_signed_big_endian() -> None:
    for key in ["backfill:2026-03", "nightly", "schlüssel:ü", "x" * 1000]:
        (expected,) = struct.unpack(">q", hashlib.sha256(key.encode("utf-8")).digest()[:8])
        ident = advisory_id(key)
        assert ident.single == expected
        assert ident.pair is None
    # Fixed values (one positive, one negative), so the ids never change silently
    # between versions: sha256("report") starts 845e91831319e89c.
    assert advisory_id("backfill:2026-03").single == 3287625425868270443
    assert advisory_id("report").single == -8908523020745054052
    assert (
        advisory_id("report").single
        == int.from_bytes(bytes.fromhex("845e91831319e89c"), "big") - 2**64
    )


async def test_postgresql_computes_the_same_id_and_sees_the_same_lock(
    advisory_lock: AdvisoryFactory, raw_conn: psycopg.AsyncConnection[Any], app: App
) -> None:
    key = "shared:with-other-languages"
    cur = await raw_conn.execute(
        "SELECT ('x' || left(encode(sha256(convert_to(%s, 'UTF8')), 'hex'), 16))::bit(64)::bigint",
        (key,),
    )
    (in_sql,) = await cur.fetchone() or (None,)
    assert in_sql == advisory_id(key).single
    await raw_conn.execute("SELECT pg_advisory_lock(%s)", (in_sql,))
    assert await app.is_locked(key)
    assert not await advisory_lock(key).acquire(timeout=0)
    await raw_conn.execute("SELECT pg_advisory_unlock(%s)", (in_sql,))
    assert not await app.is_locked(key)


async def test_two_integer_keys_are_distinct_from_each_other_and_from_string_keys(
    advisory_lock: AdvisoryFactory,
    raw_conn: psycopg.AsyncConnection[Any],
    database_url: str,
) -> None:
    march, april = advisory_lock((2026, 3)), advisory_lock((2026, 4))
    as_text = advisory_lock("(2026, 3)")  # the text the pair is listed as: another lock
    acquired = await asyncio.gather(
        march.acquire(timeout=0), april.acquire(timeout=0), as_text.acquire(timeout=0)
    )
    assert list(acquired) == [True, True, True]
    assert await advisory_rows(database_url, march.pid) == [(2026, 3, 2, True)]
    assert await advisory_rows(database_url, april.pid) == [(2026, 4, 2, True)]
    [(_, _, objsubid, _)] = await advisory_rows(database_url, as_text.pid)
    assert objsubid == 1
    # The one-bigint id with the same high and low halves is yet another lock.
    cur = await raw_conn.execute("SELECT pg_try_advisory_lock(%s)", ((2026 << 32) | 3,))
    assert await cur.fetchone() == (True,)
    await raw_conn.execute("SELECT pg_advisory_unlock(%s)", ((2026 << 32) | 3,))
    # While the same pair is excluded.
    assert not await advisory_lock((2026, 3)).acquire(timeout=0)
    for lock in (march, april, as_text):
        await lock.release()


async def test_negative_and_extreme_pairs_map_to_unsigned_ids_in_pg_locks(
    advisory_lock: AdvisoryFactory, database_url: str, app: App
) -> None:
    low, high = advisory_lock((-(2**31), -1)), advisory_lock((2**31 - 1, 0))
    assert await low.acquire(timeout=0)
    assert await high.acquire(timeout=0)
    assert await advisory_rows(database_url, low.pid) == [(2**31, 2**32 - 1, 2, True)]
    listed = {info.key: info.pid for info in await app.list_locks()}
    assert listed == {"(-2147483648, -1)": low.pid, "(2147483647, 0)": high.pid}
    assert await app.is_locked((-(2**31), -1))
    assert await app.is_locked((2**31 - 1, 0))
    assert not await app.is_locked((-(2**31), 0))
    await low.release()
    await high.release()


@pytest.mark.parametrize(
    "key",
    ["", "x" * 1001, (2**31, 0), (0, -(2**31) - 1), (1,), (1, 2, 3), True, (True, 1), (1.0, 2)],
    ids=repr,
)
async def test_invalid_keys_raise_lock_error_before_any_database_work(key: Any) -> None:
    # An unreachable server: the key is refused before anything connects.
    offline = App("postgresql://nobody@127.0.0.1:1/none", schema="conveyor")
    try:
        with pytest.raises(LockError):
            offline.lock(key)
        with pytest.raises(LockError):
            advisory_id(key)
        with pytest.raises(LockError):
            await offline.is_locked(key)
    finally:
        await offline.close()


# -- observing locks ----------------------------------------------------------


async def test_is_locked_follows_acquire_and_release(
    advisory_lock: AdvisoryFactory, app: App
) -> None:
    lock = advisory_lock("observed")
    assert not await app.is_locked("observed")
    assert await lock.acquire(timeout=0)
    assert await app.is_locked("observed")
    assert not await app.is_locked("something-else")
    await lock.release()
    assert not await app.is_locked("observed")


async def test_list_locks_shows_key_owner_pid_application_and_since(
    advisory_lock: AdvisoryFactory, app: App
) -> None:
    text, pair = advisory_lock("listed", owner="lister"), advisory_lock((7, 8), owner="pairs")
    before = time.time()
    assert await text.acquire(timeout=0)
    assert await pair.acquire(timeout=0)
    listed = {info.key: info for info in await app.list_locks()}
    assert set(listed) == {"listed", "(7, 8)"}
    info = listed["listed"]
    assert isinstance(info, LockInfo)
    assert (info.owner, info.pid, info.application_name) == ("lister", text.pid, "conveyor-lock")
    assert info.granted
    assert info.mode == "ExclusiveLock"
    assert (info.classid, info.objid, info.objsubid) == advisory_id("listed").locks_row
    assert info.since is not None
    assert info.since.timestamp() >= before - 5  # server clock, generous
    assert (listed["(7, 8)"].owner, listed["(7, 8)"].objsubid) == ("pairs", 2)
    await text.release()
    assert [info.key for info in await app.list_locks()] == ["(7, 8)"]
    await pair.release()


async def test_list_locks_shows_a_waiting_session_as_not_granted(
    advisory_lock: AdvisoryFactory, app: App
) -> None:
    holder, waiter = advisory_lock("queue"), advisory_lock("queue")
    assert await holder.acquire(timeout=0)
    waiting = asyncio.create_task(waiter.acquire(timeout=10))
    while True:  # until the waiter's session is queued in the server
        listed = await app.list_locks()
        if len(listed) == 2 or waiting.done():
            break
        await asyncio.sleep(0.01)
    assert [(info.key, info.granted) for info in listed] == [("queue", True), (None, False)]
    assert listed[0].pid == holder.pid
    await holder.release()
    assert await waiting
    assert [(info.key, info.pid) for info in await app.list_locks()] == [("queue", waiter.pid)]
    await waiter.release()


async def test_a_lock_taken_outside_conveyor_is_listed_without_key_or_owner(
    raw_conn: psycopg.AsyncConnection[Any], app: App
) -> None:
    await raw_conn.execute("SELECT pg_advisory_lock(42)")
    [info] = await app.list_locks()
    assert (info.key, info.owner) == (None, None)
    assert (info.classid, info.objid, info.objsubid) == (0, 42, 1)
    assert info.application_name == "raw-client"
    assert info.granted
    assert info.pid == raw_conn.info.backend_pid
    await raw_conn.execute("SELECT pg_advisory_unlock(42)")
    assert await app.list_locks() == []


async def test_conveyor_locks_cli_prints_held_locks(
    advisory_lock: AdvisoryFactory, raw_conn: psycopg.AsyncConnection[Any], database_url: str
) -> None:
    lock = advisory_lock("cli:shown", owner="cli-owner")
    assert await lock.acquire(timeout=0)
    await raw_conn.execute("SELECT pg_advisory_lock(42)")
    argv = ["locks", "--database-url", database_url, "--schema", "conveyor"]
    # The CLI runs its own event loop: give it a thread while this session holds the lock.
    result = await asyncio.to_thread(runner.invoke, cli, argv, env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "cli:shown" in output
    assert "cli-owner" in output
    assert str(lock.pid) in output
    assert "held" in output
    assert "(not taken through conveyor)" in output
    await raw_conn.execute("SELECT pg_advisory_unlock(42)")
    await lock.release()


async def test_conveyor_locks_cli_says_when_there_are_none(database_url: str) -> None:
    argv = ["locks", "--database-url", database_url, "--schema", "conveyor"]
    result = await asyncio.to_thread(runner.invoke, cli, argv)
    assert result.exit_code == 0, result.output
    assert "(no advisory locks)" in result.output


# -- transaction-level locks -------------------------------------------------


@pytest.fixture
async def tx_conn(database_url: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A non-autocommit session for transaction-level locks."""
    conn = await psycopg.AsyncConnection.connect(database_url)
    yield conn
    await conn.close()


async def test_xact_lock_is_released_at_commit(
    tx_conn: psycopg.AsyncConnection[Any], advisory_lock: AdvisoryFactory, app: App
) -> None:
    async with tx_conn.transaction():
        assert await app.xact_lock(tx_conn, "xact", timeout=0)
        assert await app.is_locked("xact")
        assert not await advisory_lock("xact").acquire(timeout=0)
    assert not await app.is_locked("xact")
    other = advisory_lock("xact")
    assert await other.acquire(timeout=0)
    await other.release()


async def test_xact_lock_is_released_at_rollback(
    tx_conn: psycopg.AsyncConnection[Any], app: App
) -> None:
    with pytest.raises(ZeroDivisionError):
        async with tx_conn.transaction():
            assert await app.xact_lock(tx_conn, (1, 2))
            assert await app.is_locked((1, 2))
            _ = 1 / 0
    assert not await app.is_locked((1, 2))


async def test_xact_lock_times_out_with_false_and_the_transaction_stays_usable(
    tx_conn: psycopg.AsyncConnection[Any], advisory_lock: AdvisoryFactory, app: App
) -> None:
    holder = advisory_lock("xact-busy")
    assert await holder.acquire(timeout=0)
    async with tx_conn.transaction():
        started = time.monotonic()
        assert await app.xact_lock(tx_conn, "xact-busy", timeout=0.2) is False
        assert 0.19 <= time.monotonic() - started < 3
        assert await app.xact_lock(tx_conn, "xact-busy", timeout=0) is False
        cur = await tx_conn.execute("SELECT 1 + 1")
        assert await cur.fetchone() == (2,)
        await holder.release()
        assert await app.xact_lock(tx_conn, "xact-busy", timeout=1) is True
        assert await app.is_locked("xact-busy")
    assert not await app.is_locked("xact-busy")


async def test_xact_lock_outside_a_transaction_raises_lock_error(
    tx_conn: psycopg.AsyncConnection[Any], raw_conn: psycopg.AsyncConnection[Any], app: App
) -> None:
    with pytest.raises(LockError, match="transaction"):
        await app.xact_lock(raw_conn, "no-tx")  # autocommit
    with pytest.raises(LockError, match="transaction"):
        await app.xact_lock(tx_conn, "no-tx")  # idle, no transaction begun
    assert not await app.is_locked("no-tx")


# -- use from a task ---------------------------------------------------------


async def test_job_context_lock_holds_inside_a_task_and_its_owner_names_the_job(app: App) -> None:
    @app.task(name="locked")
    async def locked(ctx: JobContext) -> dict[str, Any]:
        async with ctx.lock("job:resource", timeout=5) as lock:
            # The worker's rescuer may hold its transaction-level lock right now;
            # it has no key in the registry.
            listed = await ctx.app.list_locks()
            held = [(info.key, info.owner) for info in listed if info.key is not None]
            return {"owner": lock.owner, "held": held, "class": type(lock).__name__}

    job = await locked.enqueue()
    (done,) = await drain(app)
    assert done.id == job.id
    assert done.state == JobState.SUCCEEDED, done
    owner = f"{done.worker_id}:job-{job.id}"
    assert done.result == {
        "owner": owner,
        "held": [["job:resource", owner]],
        "class": AdvisoryLock.__name__,
    }
    assert await app.list_locks() == []


async def test_a_very_long_acquire_timeout_waits_instead_of_failing(
    advisory_lock: AdvisoryFactory,
) -> None:
    holder, patient = advisory_lock("patient"), advisory_lock("patient")
    assert await holder.acquire(timeout=0)
    # 30 days is more than PostgreSQL's lock_timeout can hold (INT_MAX ms, ~24.8 days).
    waiting = asyncio.create_task(patient.acquire(timeout=timedelta(days=30)))
    done, _ = await asyncio.wait({waiting}, timeout=0.1)
    if done:
        waiting.result()  # surfaces the error it ended with
    assert not done, "a waiting acquire returned while the lock was held"
    await holder.release()
    assert await asyncio.wait_for(waiting, timeout=5) is True
    await patient.release()


async def test_a_lock_lost_in_its_block_closes_its_connection_and_can_be_taken_again(
    advisory_lock: AdvisoryFactory, database_url: str
) -> None:
    lock = advisory_lock("lost-then-again", watch_interval=timedelta(milliseconds=20))
    with pytest.raises(LockLost):
        async with lock:
            await execute(database_url, "SELECT pg_terminate_backend(%s)", (lock.pid,))
            await asyncio.sleep(30)
    assert lock.pid is None and not lock.held
    # The object is usable again: its dead connection was dropped, not reused.
    assert await lock.acquire(timeout=2)
    await lock.release()


async def test_a_cancelled_check_statement_does_not_count_as_a_lost_lock(
    advisory_lock: AdvisoryFactory, database_url: str
) -> None:
    lock = advisory_lock("cancelled-check", watch_interval=timedelta(milliseconds=20))
    async with lock:
        for _ in range(5):
            await execute(database_url, "SELECT pg_cancel_backend(%s)", (lock.pid,))
            await asyncio.sleep(0.03)
        assert lock.held and not lock.lost
    assert not lock.held


def test_bad_durations_and_keys_are_typed_errors(app: App) -> None:
    for timeout in (float("nan"), float("inf"), -1, "5", True):
        with pytest.raises(LockError):
            app.lock("k", timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises(LockError, match="UTF-8"):
        app.lock("bad \udcff key")


async def test_a_held_lock_holds_back_no_vacuum_horizon_and_no_transaction_id(
    advisory_lock: AdvisoryFactory, database_url: str
) -> None:
    """The lock lives in a transaction kept open; between its statements that
    transaction must keep no snapshot (vacuum could not clean up behind it) and
    have no transaction id."""
    lock = advisory_lock("horizon")
    query = "SELECT state, backend_xid, backend_xmin FROM pg_stat_activity WHERE pid = %s"
    async with lock:
        idle = [("idle in transaction", None, None)]
        assert await execute(database_url, query, (lock.pid,)) == idle
        await lock.extend()
        assert await execute(database_url, query, (lock.pid,)) == idle


async def test_a_lock_is_taken_and_listed_while_every_pooled_connection_is_busy(
    database_url: str,
) -> None:
    """A task inside an atomic step holds a pooled connection while it takes a lock:
    the lock must not need one of its own from the pool."""
    app = App(config=Config(database_url=database_url, pool_size=1))
    try:
        async with app.db.connection():  # the pool's only connection, busy
            lock = app.lock("pool-busy", owner="busy")
            assert await asyncio.wait_for(lock.acquire(timeout=1), 5)
            rows = await execute(
                database_url,
                "SELECT key, owner, pid FROM conveyor.advisory_locks WHERE key = 'pool-busy'",
            )
            assert rows == [("pool-busy", "busy", lock.pid)]
            await asyncio.wait_for(lock.release(), 5)
    finally:
        await app.close()


async def test_a_failed_try_leaves_no_registry_row_behind(
    advisory_lock: AdvisoryFactory, app: App, database_url: str
) -> None:
    holder, other = advisory_lock("contended"), advisory_lock("contended")
    assert await holder.acquire(timeout=0)
    assert not await other.acquire(timeout=0)  # registered first, then refused
    registry = "SELECT owner FROM conveyor.advisory_locks ORDER BY owner"
    deadline = asyncio.get_running_loop().time() + 10
    while True:  # until the refused session's backend has exited and been purged
        await app.list_locks()
        rows = await execute(database_url, registry)
        if rows == [(holder.owner,)] or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.02)
    assert rows == [(holder.owner,)]
    await holder.release()
    await app.list_locks()
    assert await execute(database_url, registry) == []
