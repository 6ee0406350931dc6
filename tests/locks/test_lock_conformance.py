"""The shared lock contract, proved once per backend (PostgreSQL advisory and Redis).

Each test runs for both backends through the `make_lock` fixture and proves one
promise of the `Lock` protocol: mutual exclusion among concurrent contenders,
hand-over on release, `async with` releasing on error and raising `LockTimeout`
/ `LockLost`, independent keys, try-lock timeouts that return False, ownership
checks on release and extend, and strictly increasing fencing tokens.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest

from conveyor.errors import LockError, LockLost, LockNotOwned, LockTimeout
from conveyor.locks import AdvisoryLock, Lock
from conveyor.locks.base import GuardedLock
from tests.locks.conftest import LockFactory, execute


async def test_both_backends_implement_the_lock_protocol(make_lock: LockFactory) -> None:
    lock = make_lock("protocol")
    assert isinstance(lock, Lock)
    assert lock.owner
    assert not lock.held
    assert lock.fencing_token is None


async def test_exactly_one_of_three_concurrent_contenders_acquires(make_lock: LockFactory) -> None:
    contenders = [make_lock("contended") for _ in range(3)]
    results = await asyncio.gather(*(lock.acquire(timeout=0) for lock in contenders))
    assert sorted(results) == [False, False, True]
    assert [lock.held for lock in contenders] == results
    winner = contenders[results.index(True)]
    await winner.release()
    assert not winner.held


async def test_release_lets_a_waiting_contender_in(make_lock: LockFactory) -> None:
    holder, waiter = make_lock("handover"), make_lock("handover")
    assert await holder.acquire(timeout=0)
    waiting = asyncio.create_task(waiter.acquire(timeout=10))
    # The waiter blocks while the lock is held: neither acquiring nor giving up.
    done, _ = await asyncio.wait({waiting}, timeout=0.1)
    assert not done
    await holder.release()
    assert await asyncio.wait_for(waiting, timeout=5) is True
    assert waiter.held
    await waiter.release()


async def test_async_with_releases_when_the_block_raises(make_lock: LockFactory) -> None:
    lock, other = make_lock("error-in-block"), make_lock("error-in-block")
    with pytest.raises(RuntimeError, match="boom"):
        async with lock:
            assert lock.held
            raise RuntimeError("boom")
    assert not lock.held
    assert await other.acquire(timeout=0)
    await other.release()


async def test_async_with_releases_after_a_normal_block(make_lock: LockFactory) -> None:
    lock, other = make_lock("normal-block"), make_lock("normal-block")
    async with lock as entered:
        assert entered is lock
        assert not await other.acquire(timeout=0)
    assert not lock.held
    assert await other.acquire(timeout=0)
    await other.release()


async def test_different_keys_are_acquired_concurrently(make_lock: LockFactory) -> None:
    locks = [make_lock(f"key-{n}") for n in range(10)]
    assert await asyncio.gather(*(lock.acquire(timeout=0) for lock in locks)) == [True] * 10
    await asyncio.gather(*(lock.release() for lock in locks))


async def test_try_lock_with_a_timeout_returns_false_after_the_timeout(
    make_lock: LockFactory,
) -> None:
    holder, other = make_lock("try-lock"), make_lock("try-lock")
    assert await holder.acquire(timeout=0)
    started = time.monotonic()
    acquired = await other.acquire(timeout=0.2)
    waited = time.monotonic() - started
    assert acquired is False
    assert 0.19 <= waited < 3
    assert not other.held
    assert holder.held
    await holder.release()


async def test_try_lock_accepts_a_timedelta(make_lock: LockFactory) -> None:
    holder, other = make_lock("try-lock-timedelta"), make_lock("try-lock-timedelta")
    assert await holder.acquire(timeout=timedelta(0))
    assert await other.acquire(timeout=timedelta(milliseconds=50)) is False
    await holder.release()


async def test_release_by_a_non_holder_raises_lock_not_owned_and_keeps_the_lock(
    make_lock: LockFactory,
) -> None:
    holder, stranger, probe = make_lock("guarded"), make_lock("guarded"), make_lock("guarded")
    assert await holder.acquire(timeout=0)
    with pytest.raises(LockNotOwned):
        await stranger.release()
    assert holder.held
    assert not await probe.acquire(timeout=0)
    await holder.release()
    assert await probe.acquire(timeout=0)
    await probe.release()


async def test_releasing_twice_raises_lock_not_owned(make_lock: LockFactory) -> None:
    lock = make_lock("twice")
    assert await lock.acquire(timeout=0)
    await lock.release()
    with pytest.raises(LockNotOwned):
        await lock.release()


async def test_extend_by_the_owner_keeps_holding_the_lock(make_lock: LockFactory) -> None:
    lock, other = make_lock("extend", ttl=1), make_lock("extend")
    assert await lock.acquire(timeout=0)
    await lock.extend()
    await lock.extend(timedelta(seconds=2))
    await lock.extend(3)
    assert lock.held
    assert not await other.acquire(timeout=0)
    await lock.release()


async def test_extend_by_another_owner_raises_lock_not_owned(make_lock: LockFactory) -> None:
    holder, other = make_lock("extend-other"), make_lock("extend-other")
    assert holder.owner != other.owner
    assert await holder.acquire(timeout=0)
    with pytest.raises(LockNotOwned):
        await other.extend()
    assert holder.held
    await holder.extend()
    await holder.release()


async def test_extend_before_acquiring_raises_lock_not_owned(make_lock: LockFactory) -> None:
    with pytest.raises(LockNotOwned):
        await make_lock("never-acquired").extend()


async def test_two_objects_with_the_same_owner_still_exclude_each_other(
    make_lock: LockFactory,
) -> None:
    first = make_lock("same-owner", owner="worker-7")
    second = make_lock("same-owner", owner="worker-7")
    assert await first.acquire(timeout=0)
    assert not await second.acquire(timeout=0)
    await first.release()


async def test_async_with_raises_lock_timeout_when_not_acquired_within_its_timeout(
    make_lock: LockFactory,
) -> None:
    holder, late = make_lock("busy"), make_lock("busy", timeout=0.2)
    assert await holder.acquire(timeout=0)
    started = time.monotonic()
    with pytest.raises(LockTimeout) as caught:
        async with late:
            pytest.fail("the block must not run without the lock")
    assert 0.19 <= time.monotonic() - started < 3
    assert isinstance(caught.value, TimeoutError)
    assert not late.held
    await holder.release()


async def test_fencing_tokens_strictly_increase_across_acquisitions_of_a_key(
    make_lock: LockFactory,
) -> None:
    tokens: list[int] = []
    for _ in range(5):
        lock = make_lock("fenced")
        assert await lock.acquire(timeout=0)
        assert lock.fencing_token is not None
        tokens.append(lock.fencing_token)
        await lock.release()
        assert lock.fencing_token == tokens[-1], "the token of the last acquisition stays"
    assert tokens == sorted(set(tokens))


async def test_same_object_gets_a_new_fencing_token_on_reacquire(make_lock: LockFactory) -> None:
    lock = make_lock("reacquire")
    assert await lock.acquire(timeout=0)
    first = lock.fencing_token
    await lock.release()
    assert await lock.acquire(timeout=0)
    assert first is not None and lock.fencing_token is not None
    assert lock.fencing_token > first
    await lock.release()


async def test_fencing_tokens_of_advisory_locks_increase_across_keys_too(
    make_lock: LockFactory,
) -> None:
    # Advisory tokens come from one sequence; Redis keeps one counter per key.
    keys = ["a", "b", "c", "a", "d"] if make_lock.backend == "advisory" else ["a"] * 5
    tokens: list[int] = []
    for key in keys:
        lock = make_lock(key)
        assert await lock.acquire(timeout=0)
        assert lock.fencing_token is not None
        tokens.append(lock.fencing_token)
        await lock.release()
    assert tokens == sorted(set(tokens))


async def test_losing_the_lock_cancels_the_block_and_raises_lock_lost(
    make_lock: LockFactory,
) -> None:
    advisory: AdvisoryLock | None = None
    lock: GuardedLock
    if make_lock.backend == "advisory":
        # Checked every 50 ms; the loss is a kill of its session from outside.
        lock = advisory = make_lock.advisory("lost", watch_interval=timedelta(milliseconds=50))
    else:
        # 300 ms TTL, not extended: lost when the TTL runs out under the block.
        lock = make_lock.redis("lost", ttl=0.3, auto_extend=False)
    reached_end = False
    started = time.monotonic()
    with pytest.raises(LockLost):
        async with lock:
            if advisory is not None:
                rows = await execute(
                    make_lock.database_url, "SELECT pg_terminate_backend(%s)", (advisory.pid,)
                )
                assert rows == [(True,)]
            await asyncio.sleep(5)  # a block that outlives the lock
            reached_end = True
    assert not reached_end
    assert time.monotonic() - started < 3
    assert not lock.held
    assert lock.lost
    with pytest.raises(LockLost):
        lock.check()
    # The lock really is free again: another contender gets it.
    other = make_lock("lost")
    assert await other.acquire(timeout=2)
    await other.release()


async def test_cancelling_the_task_inside_the_block_still_releases(
    make_lock: LockFactory,
) -> None:
    lock, other = make_lock("cancelled"), make_lock("cancelled")
    entered = asyncio.Event()

    async def hold() -> None:
        async with lock:
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not lock.held
    assert await other.acquire(timeout=0)
    await other.release()


async def test_cancelling_a_waiting_acquire_leaves_nothing_behind(make_lock: LockFactory) -> None:
    # A long TTL: on a loaded machine the test's 2 s default could run out
    # before the waiter's first try, and the waiter would then simply acquire.
    holder, waiter, probe = (make_lock("abandoned-wait", ttl=60) for _ in range(3))
    assert await holder.acquire(timeout=0)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(waiter.acquire(timeout=10), timeout=0.1)
    assert not waiter.held
    if make_lock.backend == "advisory":
        # No orphaned waiter left queued in the server to grab the lock later.
        assert [info.granted for info in await make_lock.app.list_locks()] == [True]
    await holder.release()
    assert await probe.acquire(timeout=0)
    await probe.release()


async def test_acquiring_again_through_the_holding_object_is_never_granted_twice(
    make_lock: LockFactory,
) -> None:
    lock = make_lock("not-reentrant")
    assert await lock.acquire(timeout=0)
    token = lock.fencing_token
    try:
        again = await asyncio.wait_for(lock.acquire(timeout=0.05), timeout=2)
    except LockError:
        again = False  # advisory: "already held by this object"
    assert again is False
    assert lock.held
    assert lock.fencing_token == token
    await lock.release()
