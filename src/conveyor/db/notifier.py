"""One LISTEN connection per worker, fanning notifications out to callbacks.

The connection is dedicated (LISTEN needs a session, which a transaction-mode
pooler cannot give). When it breaks, the notifier reconnects with backoff and
calls `on_reconnect`, because notifications sent while it was away are lost:
the worker answers with a catch-up poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
from psycopg import sql

from conveyor.db.database import Database, retry_delay

log = logging.getLogger("conveyor.notifier")


def jobs_channel(schema: str) -> str:
    """The channel the jobs insert trigger notifies (`<schema>.jobs`)."""
    return f"{schema}.jobs"


class Notifier:
    """Listens on `channel` and calls `on_notify(payload)` for each notification."""

    def __init__(
        self,
        db: Database,
        channel: str,
        on_notify: Callable[[str], None],
        on_reconnect: Callable[[], None],
    ) -> None:
        self._db = db
        self._channel = channel
        self._on_notify = on_notify
        self._on_reconnect = on_reconnect
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[object] | None = None
        self.connected = asyncio.Event()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The listening task, for the worker to supervise."""
        return self._task

    def start(self) -> None:
        """Start listening in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="conveyor-notifier")

    async def stop(self) -> None:
        """Stop listening and close the connection; a second call is a no-op."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _run(self) -> None:
        failures = 0
        first = True
        while True:
            try:
                await self._listen(announce=not first)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                delay = retry_delay(min(failures, 6))
                failures += 1
                log.warning("listener lost (%s); reconnecting in %.2fs", exc, delay)
                await asyncio.sleep(delay)
            else:
                failures = 0
            first = False

    async def _listen(self, *, announce: bool) -> None:
        conninfo = await asyncio.to_thread(lambda: self._db.conninfo)
        conn = await psycopg.AsyncConnection.connect(
            conninfo, autocommit=True, **self._db.connect_kwargs("conveyor-listener")
        )
        self._conn = conn
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
            self.connected.set()
            if announce:
                self._on_reconnect()
            async for note in conn.notifies():
                self._on_notify(note.payload)
        finally:
            self._conn = None
            await conn.close()
