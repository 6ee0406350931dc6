"""PostgreSQL advisory locks.

```python
lock = app.lock("backfill:2026-03")            # or app.lock((2026, 3))
async with lock:                                # session lock on its own connection
    ...
if await lock.acquire(timeout=0.2):             # False after 200 ms, never raises
    try: ...
    finally: await lock.release()

async with conn.transaction():                  # inside your own transaction:
    if await app.xact_lock(conn, "report", timeout=1):
        ...                                     # released at commit or rollback
```

A session lock lives on a dedicated connection opened for it and closed at
release, so PostgreSQL frees it the moment its holder's connection ends (a
crash, a kill, a network cut). Holding N locks at once takes N connections.
Advisory locks are re-entrant per session; giving each lock object its own
session keeps two holders in one process mutually exclusive too.

The lock is taken at transaction level in a transaction that stays open on
that connection until release. The open transaction is what pins one server
session to the lock, so the same code is safe behind a transaction-mode pooler
(PgBouncer `pool_mode=transaction`), which may hand each new transaction to
another server session but never splits one. It also means a lock cannot
outlive its holder on a pooled server session: whatever ends the transaction
(release, a lost client, a pooler closing the server link) ends the lock. The
transaction takes no snapshot between statements and no transaction id, so it
holds back neither vacuum nor anyone's writes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq
from psycopg.rows import dict_row

from conveyor.errors import LockError, LockLost, LockNotOwned
from conveyor.locks.base import GuardedLock, Seconds, as_seconds
from conveyor.locks.keys import AdvisoryId, LockKey, advisory_id, describe

if TYPE_CHECKING:
    from conveyor.db.database import Database, Row

log = logging.getLogger("conveyor.locks")

WATCH_INTERVAL = timedelta(seconds=1)
"""How often a held lock's connection is checked while its `async with` block runs."""
XACT_POLL_MIN_S = 0.005
XACT_POLL_MAX_S = 0.1
APPLICATION_NAME = "conveyor-lock"
LOCK_TIMEOUT_MAX_MS = 2**31 - 1


@dataclass(frozen=True, kw_only=True)
class LockInfo:
    """One advisory lock of the database, held or awaited (`list_locks`)."""

    pid: int
    application_name: str | None
    granted: bool
    """True for the holder; False for a session waiting for it."""
    mode: str
    classid: int
    objid: int
    objsubid: int
    key: str | None
    """The key as given, when conveyor took the lock (else only the ids are known)."""
    owner: str | None
    since: datetime | None
    """Held: when its holder asked for it (conveyor session locks; a lock that had to
    wait shows the start of that wait). Awaited: when the wait began."""

    @classmethod
    def from_row(cls, row: Row) -> LockInfo:
        """Build from a `lock_list` row."""
        return cls(**row)


class AdvisoryLock(GuardedLock):
    """A PostgreSQL session advisory lock on its own connection."""

    def __init__(
        self,
        db: Database,
        key: LockKey,
        *,
        owner: str | None = None,
        timeout: Seconds = None,
        watch_interval: timedelta = WATCH_INTERVAL,
    ) -> None:
        super().__init__(owner=owner, timeout=timeout)
        self.key = key
        self.id: AdvisoryId = advisory_id(key)
        self._db = db
        self._watch_interval = watch_interval.total_seconds()
        self._conn: psycopg.AsyncConnection[Row] | None = None
        self._pid: int | None = None

    def __repr__(self) -> str:
        return f"<AdvisoryLock {self.describe()} owner={self.owner} held={self.held}>"

    def describe(self) -> str:
        """The key as given."""
        return describe(self.key)

    @property
    def pid(self) -> int | None:
        """The backend pid of the session holding it (while held)."""
        return self._pid

    async def _acquire(self, timeout_s: float | None) -> bool:
        if self._held and not self._lost:
            raise LockError(f"lock {self.describe()} is already held by this object")
        conn = await self._connect()
        try:
            # Registered first, in autocommit on this connection: rows written in
            # the lock's own transaction stay invisible to listings until it ends.
            registered = await self._fetch(
                conn, "register lock", "lock_register", {**self._register, "pid": None}
            )
            await conn.set_autocommit(False)
            row = await self._take(conn, timeout_s)
            if row is None:
                await conn.close()
                return False
            if row["pid"] != registered[0]["pid"]:
                # A pooler gave the lock's transaction another server session than
                # the registration: register that one, from the app's pool.
                await self._db.fetch(
                    "register lock", "lock_register", {**self._register, "pid": row["pid"]}
                )
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._pid = row["pid"]
        self._token = row["token"]
        return True

    async def _take(
        self, conn: psycopg.AsyncConnection[Row], timeout_s: float | None
    ) -> Row | None:
        params = {**self.id.params, "xact": True}
        # lock_timeout takes milliseconds as an integer ('0': no limit); round up so
        # a tiny timeout still waits rather than meaning "no limit".
        millis = 0 if timeout_s is None else max(1, int(timeout_s * 1000 + 0.999))
        if millis > LOCK_TIMEOUT_MAX_MS:
            millis = 0  # past what lock_timeout takes (about 24.8 days): no limit
        await self._fetch(conn, "open lock transaction", "lock_settings", {"timeout": str(millis)})
        if timeout_s == 0:
            rows = await self._fetch(conn, "try lock", "lock_acquire", {**params, "wait": False})
            return rows[0] if rows[0]["locked"] else None
        try:
            rows = await self._fetch(conn, "acquire lock", "lock_acquire", {**params, "wait": True})
        except psycopg.errors.LockNotAvailable:
            return None
        return rows[0]

    @property
    def _register(self) -> dict[str, Any]:
        classid, objid, objsubid = self.id.locks_row
        return {
            "classid": classid,
            "objid": objid,
            "objsubid": objsubid,
            "key": self.describe(),
            "owner": self.owner,
        }

    async def release(self) -> None:
        """Release the lock and close its connection; `LockNotOwned` if not held here,
        `LockLost` if its connection had already ended (so had the lock)."""
        conn, self._conn = self._conn, None
        was_held = self._held
        self._held = False
        self._pid = None
        if conn is None or not was_held:
            raise LockNotOwned(f"lock {self.describe()} is not held by owner {self.owner}")
        try:
            rows = await self._fetch(conn, "release lock", "lock_release", self._ids)
            await conn.commit()
        except psycopg.Error as exc:
            raise LockLost(f"lock {self.describe()}: its transaction ended ({exc})") from exc
        finally:
            await conn.close()
        if not rows[0]["released"]:
            raise LockLost(f"lock {self.describe()} was no longer held by its session")

    async def extend(self, ttl: Seconds = None) -> None:
        """Advisory locks have no TTL: check the lock is still held (`LockLost` if not)."""
        as_seconds(ttl)
        conn = self._conn
        if conn is None or not self._held:
            raise LockNotOwned(f"lock {self.describe()} is not held by owner {self.owner}")
        try:
            rows = await self._check(conn, "lock_held_here")
        except psycopg.Error as exc:
            self._lost = True
            raise LockLost(f"lock {self.describe()}: its transaction ended ({exc})") from exc
        if not rows[0]["held"]:
            self._lost = True
            raise LockLost(f"lock {self.describe()} is no longer held by its session")

    async def close(self) -> None:
        """Drop the connection (and with it the lock) without a release statement."""
        conn, self._conn = self._conn, None
        self._held = False
        self._pid = None
        if conn is not None:
            await conn.close()

    async def _watch(self) -> None:
        conn = self._conn
        while conn is not None and not conn.closed:
            await asyncio.sleep(self._watch_interval)
            try:
                await self._check(conn, "lock_alive")
            except psycopg.Error as exc:
                if not conn.broken and not conn.closed:
                    # A cancelled statement (pg_cancel_backend), not a lost session:
                    # the savepoint kept the lock's transaction, and so the lock.
                    log.warning("advisory lock %s: check failed (%s)", self.describe(), exc)
                    continue
                log.error("advisory lock %s lost: its connection ended (%s)", self.describe(), exc)
                return

    async def _check(self, conn: psycopg.AsyncConnection[Row], query: str) -> list[Row]:
        """Run a check inside a savepoint: an error in it (a cancel) rolls back to
        the savepoint instead of aborting the transaction the lock lives in."""
        async with conn.transaction():
            return await self._fetch(conn, "check lock", query, self._ids)

    async def _discard(self) -> None:
        await self.close()

    @property
    def _ids(self) -> dict[str, int]:
        classid, objid, objsubid = self.id.locks_row
        return {"classid": classid, "objid": objid, "objsubid": objsubid}

    async def _connect(self) -> psycopg.AsyncConnection[Row]:
        kwargs = self._db.connect_kwargs(application_name=APPLICATION_NAME)
        kwargs["prepare_threshold"] = None
        # Client-side binding sends every statement as a simple query, whose portal
        # (and snapshot) is dropped when it ends; an extended-protocol portal would
        # stay open, holding back the vacuum horizon for as long as the lock is held.
        return await psycopg.AsyncConnection.connect(
            self._db.conninfo,
            autocommit=True,
            row_factory=dict_row,
            cursor_factory=psycopg.AsyncClientCursor,
            **kwargs,
        )

    async def _fetch(
        self,
        conn: psycopg.AsyncConnection[Row],
        purpose: str,
        query: str,
        params: dict[str, Any],
    ) -> list[Row]:
        cur = await conn.execute(self._db.queries[query], params)
        return await cur.fetchall() if cur.description else []


async def xact_lock(
    db: Database, conn: psycopg.AsyncConnection[Any], key: LockKey, timeout: Seconds = None
) -> bool:
    """Take a transaction-level advisory lock in `conn`'s open transaction.

    Released when that transaction commits or rolls back. True once held;
    False when `timeout` passed first, with the transaction still usable (the
    wait polls `pg_try_advisory_xact_lock`, so no error aborts it).
    """
    if conn.info.transaction_status != pq.TransactionStatus.INTRANS:
        raise LockError(
            "a transaction-level lock needs an open transaction "
            "(use `async with conn.transaction():`); in autocommit it would end at once"
        )
    ident = advisory_id(key)
    timeout_s = as_seconds(timeout)
    statement = db.queries["lock_acquire"]
    params = {**ident.params, "xact": True, "wait": timeout_s is None}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    delay = XACT_POLL_MIN_S
    async with conn.cursor(row_factory=dict_row) as cur:
        while True:
            await cur.execute(statement, params)
            row = await cur.fetchone()
            if row is not None and row["locked"]:
                return True
            assert deadline is not None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, XACT_POLL_MAX_S)


async def is_locked(db: Database, key: LockKey) -> bool:
    """Whether any session of the database holds the advisory lock of `key`."""
    classid, objid, objsubid = advisory_id(key).locks_row
    rows = await db.fetch(
        "check lock",
        "lock_is_locked",
        {"classid": classid, "objid": objid, "objsubid": objsubid},
    )
    return bool(rows[0]["locked"])


async def list_locks(db: Database) -> list[LockInfo]:
    """Every advisory lock of the database, held first, with key and owner when known."""
    await db.fetch("purge lock registry", "lock_registry_purge")
    return [LockInfo.from_row(row) for row in await db.fetch("list locks", "lock_list")]
