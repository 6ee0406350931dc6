"""The gateway to PostgreSQL: pools, named statements, retries, typed errors.

Every statement conveyor sends goes through `Database.fetch` (async) or
`Database.fetch_sync` (sync, for enqueueing from Django/Flask code). Both
retry transient failures with bounded backoff when they own the connection;
on a caller's connection they never retry, because the caller owns the
transaction and must decide.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from conveyor.config import Config
from conveyor.db.connect import connection_kwargs, resolve_database_url, use_fast_json
from conveyor.db.queries import Queries
from conveyor.db.shielding import borrowed, give_back, run_to_end, take
from conveyor.db.sqlstate import is_transient, surely_not_applied, to_database_error

log = logging.getLogger("conveyor.db")

Row = dict[str, Any]
Params = Mapping[str, Any]
T = TypeVar("T")

RETRY_BASE_DELAY_S = 0.05
RETRY_MAX_DELAY_S = 2.0


class OutcomeUnknown(Exception):
    """A non-idempotent statement failed in a way that may have applied it."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def retry_delay(attempt: int) -> float:
    """Backoff before retry number `attempt` (0-based): full jitter, capped."""
    ceiling = min(RETRY_BASE_DELAY_S * 2**attempt, RETRY_MAX_DELAY_S)
    return random.uniform(ceiling / 2, ceiling)


class Database:
    """Connection pools and named statements for one `Config`."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.queries = Queries(config.schema)
        self._conninfo: str | None = None
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Row]] | None = None
        self._pool_lock = asyncio.Lock()
        self._sync_pool: ConnectionPool[psycopg.Connection[Row]] | None = None
        self._sync_lock = threading.Lock()

    @property
    def conninfo(self) -> str:
        """The resolved connection URL (starts the embedded server on first use)."""
        if self._conninfo is None:
            self._conninfo = resolve_database_url(self.config)
        return self._conninfo

    @property
    def schema(self) -> str:
        """The schema conveyor's tables live in."""
        return self.config.schema

    @property
    def session_conninfo(self) -> str:
        """The URL for a worker's control session: `Config.session_url`, else `conninfo`."""
        return self.config.session_url or self.conninfo

    def connect_kwargs(
        self, application_name: str = "conveyor", *, conninfo: str | None = None
    ) -> dict[str, Any]:
        """Keyword arguments for a dedicated connection (the control session, locks)
        to `conninfo` (default: `self.conninfo`)."""
        return connection_kwargs(
            self.config, conninfo=conninfo or self.conninfo, application_name=application_name
        )

    # -- async -------------------------------------------------------------

    async def pool(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Row]]:
        """The async pool, opened on first use."""
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    conninfo = await asyncio.to_thread(lambda: self.conninfo)
                    pool: AsyncConnectionPool[psycopg.AsyncConnection[Row]] = AsyncConnectionPool(
                        conninfo,
                        min_size=1,
                        max_size=self.config.pool_size,
                        kwargs={
                            "autocommit": True,
                            "row_factory": dict_row,
                            **self.connect_kwargs(),
                        },
                        connection_class=psycopg.AsyncConnection[Row],
                        configure=_configure_async,
                        timeout=self.config.connect_timeout.total_seconds(),
                        open=False,
                        name="conveyor",
                    )
                    await pool.open()
                    self._pool = pool
        return self._pool

    async def fetch(
        self,
        purpose: str,
        query: str,
        params: Params | None = None,
        *,
        conn: psycopg.AsyncConnection[Any] | None = None,
        idempotent: bool = True,
        before_send: Callable[[int], None] | None = None,
    ) -> list[Row]:
        """Run the named `query` and return its rows as dicts.

        A statement that is not `idempotent` (an insert) is retried only when it
        surely did not apply: the connection could not be had, or the server
        reported an error. A connection lost mid-statement leaves its outcome
        unknown, so that failure is raised instead of risking a duplicate.
        `before_send` gets the backend process id of the connection each
        attempt is about to use (the pid its NOTIFYs will carry).
        """
        statement = self.queries[query]
        if conn is not None:
            if before_send is not None:
                before_send(conn.info.backend_pid)
            try:
                if conn.row_factory is dict_row:  # one of ours: no cursor of its own needed
                    cur = await conn.execute(statement, params)
                    return await cur.fetchall() if cur.description else []
                async with conn.cursor(row_factory=dict_row) as own_cursor:
                    await own_cursor.execute(statement, params)
                    return await own_cursor.fetchall() if own_cursor.description else []
            except psycopg.Error as exc:
                raise to_database_error(purpose, exc, exhausted=False) from exc

        async def attempt() -> list[Row]:
            pool = await self.pool()
            # Safe from the caller's cancellation: this runs in its own task.
            async with pool.connection() as own:
                if before_send is not None:
                    before_send(own.info.backend_pid)
                try:
                    cur = await own.execute(statement, params)
                    return await cur.fetchall() if cur.description else []
                except Exception as exc:
                    if not idempotent and not surely_not_applied(exc):
                        raise OutcomeUnknown(exc) from exc
                    raise

        # A cancelled caller (a job being cancelled, say) stops waiting at once;
        # the statement itself runs to its end and its connection goes back to
        # the pool (see conveyor.db.shielding).
        return await self.retrying(purpose, lambda: run_to_end(attempt()))

    async def fetch_each(
        self,
        purpose: str,
        query: str,
        params: Iterable[Params],
        *,
        conn: psycopg.AsyncConnection[Any],
    ) -> list[list[Row]]:
        """Run the named `query` once per item of `params` on `conn`, in one pipeline.

        Each statement is sent without waiting for the one before it, so the
        server inserts one batch while this process dumps and sends the next. `conn`
        is the caller's, in a transaction: like `fetch` on a caller's
        connection, nothing is retried.
        """
        statement = self.queries[query]
        try:
            async with conn.pipeline():
                cursors = []
                for item in params:
                    cursor = conn.cursor(row_factory=dict_row)
                    await cursor.execute(statement, item)
                    cursors.append(cursor)
                return [await cursor.fetchall() for cursor in cursors]
        except psycopg.Error as exc:
            raise to_database_error(purpose, exc, exhausted=False) from exc

    async def hold(self, purpose: str) -> psycopg.AsyncConnection[Row]:
        """A pooled connection kept past this call (autocommit, dict rows), until
        `release`: for a caller that runs statements back to back, so that each
        does not borrow and return one (about a tenth of a short claim's time)."""
        try:
            conn: psycopg.AsyncConnection[Row] = await take(await self.pool())
        except (psycopg.Error, PoolTimeout) as exc:
            raise to_database_error(purpose, exc, exhausted=False) from exc
        return conn

    async def release(self, conn: psycopg.AsyncConnection[Row]) -> None:
        """Give back a connection from `hold` (a broken one is discarded by the pool)."""
        await give_back(await self.pool(), conn)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Row]]:
        """A pooled connection (autocommit, dict rows) for the length of the block.

        Use this rather than the pool's own `connection()` in code that may be
        cancelled, such as a task: the connection returns to the pool however the
        block ends. Open `conn.transaction()` inside it for a transaction.
        """
        async with borrowed(await self.pool()) as conn:
            yield conn

    async def retrying(self, purpose: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation`, retrying transient failures with backoff."""
        retries = self.config.statement_retries
        for attempt in range(retries + 1):
            try:
                return await operation()
            except Exception as exc:
                cause = exc.cause if isinstance(exc, OutcomeUnknown) else exc
                if isinstance(exc, OutcomeUnknown) or not is_transient(exc) or attempt == retries:
                    raise to_database_error(purpose, cause, exhausted=True) from cause
                delay = retry_delay(attempt)
                log.warning("%s: transient failure (%s), retry in %.2fs", purpose, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- sync --------------------------------------------------------------

    def sync_pool(self) -> ConnectionPool[psycopg.Connection[Row]]:
        """The sync pool for enqueueing from sync code, opened on first use."""
        with self._sync_lock:
            if self._sync_pool is None:
                pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
                    self.conninfo,
                    min_size=1,
                    max_size=self.config.pool_size,
                    kwargs={"autocommit": True, "row_factory": dict_row, **self.connect_kwargs()},
                    connection_class=psycopg.Connection[Row],
                    configure=use_fast_json,
                    timeout=self.config.connect_timeout.total_seconds(),
                    open=False,
                    name="conveyor-sync",
                )
                pool.open()
                self._sync_pool = pool
            return self._sync_pool

    def fetch_sync(
        self,
        purpose: str,
        query: str,
        params: Params | None = None,
        *,
        conn: psycopg.Connection[Any] | None = None,
        idempotent: bool = True,
    ) -> list[Row]:
        """Sync twin of `fetch`."""
        statement = self.queries[query]
        if conn is not None:
            try:
                with conn.cursor(row_factory=dict_row) as cur:
                    cur.execute(statement, params)
                    return cur.fetchall() if cur.description else []
            except psycopg.Error as exc:
                raise to_database_error(purpose, exc, exhausted=False) from exc
        retries = self.config.statement_retries
        for attempt in range(retries + 1):
            sent = False
            try:
                with self.sync_pool().connection() as own:
                    sent = True
                    cur = own.execute(statement, params)
                    return cur.fetchall() if cur.description else []
            except Exception as exc:
                unknown = sent and not idempotent and not surely_not_applied(exc)
                if unknown or not is_transient(exc) or attempt == retries:
                    raise to_database_error(purpose, exc, exhausted=True) from exc
                time.sleep(retry_delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def fetch_each_sync(
        self,
        purpose: str,
        query: str,
        params: Iterable[Params],
        *,
        conn: psycopg.Connection[Any],
    ) -> list[list[Row]]:
        """Sync twin of `fetch_each`."""
        statement = self.queries[query]
        try:
            with conn.pipeline():
                cursors = []
                for item in params:
                    cursor = conn.cursor(row_factory=dict_row)
                    cursor.execute(statement, item)
                    cursors.append(cursor)
                return [cursor.fetchall() for cursor in cursors]
        except psycopg.Error as exc:
            raise to_database_error(purpose, exc, exhausted=False) from exc

    # -- lifecycle ---------------------------------------------------------

    async def close(self) -> None:
        """Close both pools; safe to call twice."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
        sync_pool, self._sync_pool = self._sync_pool, None
        if sync_pool is not None:
            await asyncio.to_thread(sync_pool.close)

    def close_sync(self) -> None:
        """Close the sync pool (the async one belongs to an event loop)."""
        sync_pool, self._sync_pool = self._sync_pool, None
        if sync_pool is not None:
            sync_pool.close()


async def _configure_async(conn: psycopg.AsyncConnection[Row]) -> None:
    """Set up each connection the async pool opens (see `use_fast_json`)."""
    use_fast_json(conn)
