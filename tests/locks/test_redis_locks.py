"""Redis locks: what only this backend promises.

Proves what is stored (the owner id under `<prefix>{key}`, with a PX TTL), that
the TTL frees a lock nobody released, that auto-extend keeps a lock alive
across several TTLs while its block runs and deletes it after, that a lock
deleted or taken over under a running block is reported as `LockLost`, that
release and extend survive the client's connections being killed (the client
reconnects), that a block ending while the guard is mid-extend still exits and
releases, that the Lua scripts check the owner (a different owner changes
nothing; the same owner string may release, spec B), that fencing tokens of a
key grow by one per acquisition across lock objects, and that a reply lost
after the server ran acquire/release/extend (a network cut) neither orphans
the key nor misreports the outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor.errors import LockError, LockLost, LockNotOwned
from conveyor.locks import RedisLock, redis_client
from tests.locks.conftest import RedisFactory


async def stored(admin: redis.asyncio.Redis, lock: RedisLock) -> tuple[str | None, int]:
    """The owner stored in the lock key (its value is `<owner>|<nonce of the acquire>`)
    and its remaining TTL in ms (-2 when the key does not exist)."""
    value = await admin.get(lock.redis_key)
    assert value is None or isinstance(value, str)
    pttl: int = await admin.pttl(lock.redis_key)
    return (None if value is None else value.rsplit("|", 1)[0]), pttl


async def test_the_stored_value_is_the_owner_id_under_the_braced_key_with_the_ttl(
    redis_lock: RedisFactory, admin_client: redis.asyncio.Redis, redis_prefix: str
) -> None:
    lock = redis_lock("stored", owner="worker-1", ttl=1.5)
    assert lock.redis_key == f"{redis_prefix}{{stored}}"
    assert lock.fence_key == f"{redis_prefix}{{stored}}:fence"
    assert await lock.acquire(timeout=0)
    value, pttl = await stored(admin_client, lock)
    assert value == "worker-1"
    assert 0 < pttl <= 1500
    assert 0 < lock.expires_in <= 1.5
    assert await admin_client.get(lock.fence_key) == str(lock.fencing_token)
    await lock.release()
    assert await stored(admin_client, lock) == (None, -2)
    assert lock.expires_in == 0


async def test_default_owner_is_stored_when_none_is_given(
    redis_lock: RedisFactory, admin_client: redis.asyncio.Redis
) -> None:
    lock = redis_lock("default-owner")
    assert await lock.acquire(timeout=0)
    assert (await stored(admin_client, lock))[0] == lock.owner
    await lock.release()


async def test_the_ttl_frees_a_lock_nobody_released(
    redis_lock: RedisFactory, admin_client: redis.asyncio.Redis
) -> None:
    forgotten, next_one = redis_lock("ttl", ttl=0.2), redis_lock("ttl")
    assert await forgotten.acquire(timeout=0)
    started = time.monotonic()
    assert await next_one.acquire(timeout=1)
    assert time.monotonic() - started >= 0.1  # it had to wait for (most of) the TTL
    assert (await stored(admin_client, next_one))[0] == next_one.owner
    assert forgotten.expires_in == 0
    # The forgotten holder can no longer release (or extend) what is now another's.
    with pytest.raises(LockNotOwned):
        await forgotten.release()
    with pytest.raises(LockNotOwned):
        await forgotten.extend()
    assert (await stored(admin_client, next_one))[0] == next_one.owner
    await next_one.release()


async def test_release_after_the_ttl_ran_out_raises_lock_not_owned(
    redis_lock: RedisFactory, admin_client: redis.asyncio.Redis
) -> None:
    lock = redis_lock("expired", ttl=0.2)
    assert await lock.acquire(timeout=0)
    await asyncio.sleep(0.3)  # the TTL itself is under test
    assert await admin_client.exists(lock.redis_key) == 0
    with pytest.raises(LockNotOwned, match="expired"):
        await lock.release()


class GuardExtends:
    """Counts the successful extends a lock's guard makes, so a test can wait for
    the next one (and end its block right after it, when the guard is asleep)."""

    def __init__(self, lock: RedisLock, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self._changed = asyncio.Condition()
        real_extend = lock.extend

        async def counting_extend(ttl: Any = None) -> None:
            await real_extend(ttl)
            async with self._changed:
                self.count += 1
                self._changed.notify_all()

        monkeypatch.setattr(lock, "extend", counting_extend)

    async def next(self) -> None:
        """Wait (at most 2 s) until the guard has extended the lock once more."""
        async with asyncio.timeout(2), self._changed:
            seen = self.count
            await self._changed.wait_for(lambda: self.count > seen)


async def test_auto_extend_keeps_the_lock_past_several_ttls_and_the_key_goes_after_the_block(
    redis_lock: RedisFactory, admin_client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock, rival = redis_lock("long-job", ttl=0.2), redis_lock("long-job")
    extends = GuardExtends(lock, monkeypatch)
    started = time.monotonic()
    async with lock:
        token = lock.fencing_token
        while time.monotonic() - started < 3 * lock.ttl:  # three TTLs and more
            await extends.next()
            value, pttl = await stored(admin_client, lock)
            assert value == lock.owner
            assert 0 < pttl <= 200
            lock.check()
        assert extends.count >= 8  # one per ttl/3
        assert not await rival.acquire(timeout=0)
        assert lock.fencing_token == token, "extending draws no new token"
    assert not lock.held
    assert await admin_client.exists(lock.redis_key) == 0


async def test_a_lock_deleted_under_a_running_block_is_lost(
    redis_lock: RedisFactory, admin_client: redis.asyncio.Redis
) -> None:
    lock = redis_lock("deleted", ttl=0.3)
    reached_end = False
    started = time.monotonic()
    with pytest.raises(LockLost):
        async with lock:
            assert await admin_client.delete(lock.redis_key) == 1
            await asyncio.sleep(5)  # a block that outlives the lock
            reached_end = True
    assert not reached_end
    assert time.monotonic() - started < 3
    assert lock.lost


async def test_a_lock_taken_over_by_another_owner_is_lost_and_left_to_that_owner(
    redis_lock: RedisFactory, admin_client: redis.asyncio.Redis
) -> None:
    lock = redis_lock("taken-over", ttl=0.3)
    with pytest.raises(LockLost):
        async with lock:
            await admin_client.set(lock.redis_key, "intruder", px=5000)
            await asyncio.sleep(5)
    value, _ = await stored(admin_client, lock)
    assert value == "intruder", "the lost holder must not delete another owner's lock"
    await admin_client.delete(lock.redis_key)


async def kill_connections(admin: redis.asyncio.Redis, name: str) -> int:
    """Kill, server-side, every connection whose client name is `name`."""
    clients: list[dict[str, Any]] = await admin.client_list()
    ids = [c["id"] for c in clients if c.get("name") == name]
    for ident in ids:
        await admin.client_kill_filter(_id=ident)
    return len(ids)


@pytest.mark.parametrize("how", ["client-kill", "pool-disconnect"])
async def test_extend_and_release_succeed_after_the_connections_were_lost(
    redis_lock: RedisFactory,
    client: redis.asyncio.Redis,
    admin_client: redis.asyncio.Redis,
    redis_client_name: str,
    how: Literal["client-kill", "pool-disconnect"],
) -> None:
    lock = redis_lock("flaky-network", ttl=1)
    assert await lock.acquire(timeout=0)
    if how == "client-kill":
        assert await kill_connections(admin_client, redis_client_name) >= 1
    else:
        await client.connection_pool.disconnect()
    await lock.extend(2)
    value, pttl = await stored(admin_client, lock)
    assert value == lock.owner
    assert 1000 < pttl <= 2000
    if how == "client-kill":
        assert await kill_connections(admin_client, redis_client_name) >= 1
    await lock.release()
    assert await admin_client.exists(lock.redis_key) == 0


async def test_an_auto_extended_block_survives_its_connections_being_killed(
    redis_lock: RedisFactory,
    admin_client: redis.asyncio.Redis,
    redis_client_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lock = redis_lock("killed-under-block", ttl=0.3)
    extends = GuardExtends(lock, monkeypatch)
    async with lock:
        for _ in range(3):
            assert await kill_connections(admin_client, redis_client_name) >= 1
            await extends.next()  # the guard reconnected and extended
            lock.check()
        assert (await stored(admin_client, lock))[0] == lock.owner
    assert not lock.lost
    assert await admin_client.exists(lock.redis_key) == 0


async def test_a_block_that_ends_while_the_guard_sends_an_extend_exits_and_releases(
    redis_lock: RedisFactory, redis_url: str, admin_client: redis.asyncio.Redis
) -> None:
    # conveyor's client (socket_timeout=5), with a probe that tells when the guard's
    # EVALSHA is being written: the block ends in exactly that moment.
    client = redis_client(redis_url)
    guard_sending = asyncio.Event()
    pool = client.connection_pool
    base: type[Any] = pool.connection_class

    class ProbedConnection(base):  # type: ignore[misc]
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            task = asyncio.current_task()
            if task is not None and task.get_name().startswith("lock-guard"):
                guard_sending.set()
            await super().send_packed_command(command, check_health)

    pool.connection_class = ProbedConnection
    lock = redis_lock("exit-during-extend", ttl=0.3, lock_client=client)
    try:
        async with asyncio.timeout(1):  # without it, a hang here lasts forever
            async with lock:
                await guard_sending.wait()
        assert not lock.held
        assert await admin_client.exists(lock.redis_key) == 0
    except TimeoutError:
        pytest.fail(
            "`async with` did not return: the guard swallowed its cancellation "
            "(asyncio.wait_for in redis-py's send) and kept extending the lock"
        )
    finally:
        await admin_client.delete(lock.redis_key)
        await client.aclose()


async def test_release_by_a_different_owner_changes_nothing_but_the_same_owner_may_release(
    redis_lock: RedisFactory, admin_client: redis.asyncio.Redis
) -> None:
    holder = redis_lock("spec-b", owner="worker-A")
    assert await holder.acquire(timeout=0)
    stranger = redis_lock("spec-b", owner="worker-B")
    with pytest.raises(LockNotOwned):
        await stranger.release()
    with pytest.raises(LockNotOwned):
        await stranger.extend(5)
    value, pttl = await stored(admin_client, holder)
    assert value == "worker-A"
    assert pttl <= 2000, "a wrong owner's extend must not touch the TTL"
    # Spec B: the owner is the worker's identity; another object of that worker may
    # extend and release the lock.
    same_worker = redis_lock("spec-b", owner="worker-A")
    await same_worker.extend(3)
    assert 2000 < (await stored(admin_client, holder))[1] <= 3000
    await same_worker.release()
    assert await admin_client.exists(holder.redis_key) == 0
    with pytest.raises(LockNotOwned):
        await holder.release()


async def test_fencing_tokens_grow_by_one_over_20_acquisitions_across_lock_objects(
    redis_lock: RedisFactory, admin_client: redis.asyncio.Redis
) -> None:
    tokens: list[int] = []
    for n in range(20):
        lock = redis_lock("fenced", owner=f"worker-{n % 3}")
        assert await lock.acquire(timeout=1)
        assert lock.fencing_token is not None
        tokens.append(lock.fencing_token)
        await lock.release()
    assert tokens == list(range(tokens[0], tokens[0] + 20))
    # The counter outlives the lock, so tokens keep growing after a release.
    assert await admin_client.get(lock.fence_key) == str(tokens[-1])
    assert await admin_client.exists(lock.redis_key) == 0


async def test_fencing_tokens_of_different_keys_are_counted_separately(
    redis_lock: RedisFactory,
) -> None:
    first, second = redis_lock("counter-a"), redis_lock("counter-b")
    assert await first.acquire(timeout=0)
    assert await second.acquire(timeout=0)
    assert first.fencing_token == second.fencing_token == 1
    await first.release()
    await second.release()


async def test_an_acquire_error_after_the_server_acquired_is_recovered_on_the_next_try(
    redis_lock: RedisFactory, admin_client: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = redis_lock("lost-reply", ttl=5)
    real_script = lock._acquire_script
    calls = 0

    async def reply_lost_once(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        result = await real_script(**kwargs)  # the server did acquire...
        if calls == 1:
            raise RedisConnectionError("reply lost")  # ...but the answer never came
        return result

    monkeypatch.setattr(lock, "_acquire_script", reply_lost_once)
    assert await lock.acquire(timeout=1)
    assert calls == 2, "the replay recognised this acquire's own value"
    assert lock.fencing_token == 1, "without a second SET (no second token drawn)"
    assert (await stored(admin_client, lock))[0] == lock.owner
    await lock.release()
    assert await admin_client.exists(lock.redis_key) == 0


@pytest.mark.parametrize(
    ("key", "ttl"),
    [("", 1.0), (("a", "b"), 1.0), ("ok", 0), ("ok", 0.0005)],
    ids=["empty-key", "tuple-key", "zero-ttl", "sub-millisecond-ttl"],
)
def test_bad_keys_and_ttls_raise_lock_error(
    client: redis.asyncio.Redis, redis_prefix: str, key: Any, ttl: float
) -> None:
    with pytest.raises(LockError):
        RedisLock(client, key, ttl=ttl, prefix=redis_prefix)


def test_a_negative_ttl_raises_a_typed_lock_error(client: redis.asyncio.Redis) -> None:
    with pytest.raises(LockError, match="negative"):
        RedisLock(client, "ok", ttl=-1)
    with pytest.raises(LockError, match="finite"):
        RedisLock(client, "ok", ttl=float("inf"))


class ReplyLoss:
    """Drops replies on a client's connections: the server ran the command, the
    client sees a connection error (a network cut right after the request)."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.pending = 0
        pool = client.connection_pool
        base: type[Any] = pool.connection_class
        loss = self

        class LossyConnection(base):  # type: ignore[misc]
            async def read_response(self, *args: Any, **kwargs: Any) -> Any:
                response = await super().read_response(*args, **kwargs)
                if loss.pending:
                    loss.pending -= 1
                    await self.disconnect()
                    raise RedisConnectionError("injected: the reply was lost")
                return response

        pool.connection_class = LossyConnection

    def lose_next(self, replies: int = 1) -> None:
        """Drop the next `replies` replies (of commands already sent or about to be)."""
        self.pending = replies


@pytest.fixture
async def lossy_client(redis_url: str) -> AsyncIterator[tuple[redis.asyncio.Redis, ReplyLoss]]:
    """A conveyor Redis client (retrying, reconnecting) whose replies can be dropped."""
    instance = redis_client(redis_url)
    loss = ReplyLoss(instance)
    yield instance, loss
    await instance.aclose()


async def warm_up(lock: RedisLock) -> None:
    """Connect and load the scripts, so the next reply read is the command's own."""
    assert await lock.acquire(timeout=0)
    await lock.release()


async def test_an_acquire_whose_reply_was_lost_in_the_client_still_acquires(
    redis_lock: RedisFactory,
    lossy_client: tuple[redis.asyncio.Redis, ReplyLoss],
    admin_client: redis.asyncio.Redis,
) -> None:
    client, loss = lossy_client
    await warm_up(redis_lock("warm-up", lock_client=client))
    lock = redis_lock("reply-lost-acquire", ttl=5, lock_client=client)
    loss.lose_next()
    try:
        acquired = await lock.acquire(timeout=0.3)
        value, _ = await stored(admin_client, lock)
        assert (acquired, value) == (True, lock.owner), (
            "the server set the key for this owner, but acquire() returned "
            f"{acquired}: the key is orphaned until its TTL"
        )
        await lock.release()
    finally:
        await admin_client.delete(lock.redis_key)


async def test_a_try_lock_whose_reply_was_lost_does_not_orphan_the_key(
    redis_lock: RedisFactory,
    admin_client: redis.asyncio.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lock = redis_lock("reply-lost-try", ttl=5)
    real_script = lock._acquire_script

    async def reply_lost(**kwargs: Any) -> Any:
        await real_script(**kwargs)  # the server did acquire...
        raise RedisConnectionError("reply lost")  # ...but the answer never came

    monkeypatch.setattr(lock, "_acquire_script", reply_lost)
    try:
        acquired = await lock.acquire(timeout=0)
        value, _ = await stored(admin_client, lock)
        assert acquired or value is None, (
            "acquire(timeout=0) returned False but left the key held by its own owner "
            f"{value!r}: nobody will release it before the TTL"
        )
        if acquired:
            await lock.release()
    finally:
        await admin_client.delete(lock.redis_key)


async def test_a_release_whose_reply_was_lost_in_the_client_still_succeeds(
    redis_lock: RedisFactory,
    lossy_client: tuple[redis.asyncio.Redis, ReplyLoss],
    admin_client: redis.asyncio.Redis,
) -> None:
    client, loss = lossy_client
    await warm_up(redis_lock("warm-up", lock_client=client))
    lock = redis_lock("reply-lost-release", ttl=5, lock_client=client)
    assert await lock.acquire(timeout=0)
    loss.lose_next()
    await lock.release()  # the key is deleted; only the reply went missing
    assert await admin_client.exists(lock.redis_key) == 0


async def test_an_extend_whose_reply_was_lost_in_the_client_still_succeeds(
    redis_lock: RedisFactory,
    lossy_client: tuple[redis.asyncio.Redis, ReplyLoss],
    admin_client: redis.asyncio.Redis,
) -> None:
    client, loss = lossy_client
    await warm_up(redis_lock("warm-up", lock_client=client))
    lock = redis_lock("reply-lost-extend", ttl=1, lock_client=client)
    assert await lock.acquire(timeout=0)
    loss.lose_next()
    await lock.extend(3)
    assert 2000 < (await stored(admin_client, lock))[1] <= 3000
    await lock.release()


async def test_a_hold_that_expired_never_touches_a_newer_hold_of_the_same_owner(
    redis_lock: RedisFactory, admin_client: redis.asyncio.Redis
) -> None:
    stale = redis_lock("same-owner", owner="worker-7", ttl=0.2)
    assert await stale.acquire(timeout=0)
    fresh = redis_lock("same-owner", owner="worker-7", ttl=5)
    assert await fresh.acquire(timeout=2)  # after the stale hold's TTL ran out
    with pytest.raises(LockNotOwned):
        await stale.extend(10)
    with pytest.raises(LockNotOwned):
        await stale.release()
    owner, pttl = await stored(admin_client, fresh)
    assert owner == "worker-7" and pttl > 4000, "the newer hold must be untouched"
    await fresh.release()


async def test_a_lost_block_is_told_before_the_ttl_even_when_extends_hang(
    redis_lock: RedisFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = redis_lock("hanging-extend", ttl=0.3)

    async def hang(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(60)

    started = asyncio.get_running_loop().time()
    with pytest.raises(LockLost):
        async with lock:
            monkeypatch.setattr(lock, "extend", hang)
            await asyncio.sleep(30)
    # Told by the TTL on the holder's clock, not after a 60 s extend.
    assert asyncio.get_running_loop().time() - started < 5
