"""The control session: one dedicated connection per worker for LISTEN and the heartbeat.

LISTEN needs a session (a transaction-mode pooler cannot give one: behind one,
`Config.session_url` points this connection past it), and the
heartbeat must never wait behind job work for a pooled connection, or a busy
worker would lose its own leases. Both live on this connection: between
heartbeats it waits for notifications. When the connection breaks it
reconnects with backoff and calls `on_reconnect`, because notifications sent
while it was away are lost: the worker answers with a catch-up claim.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import psycopg
from psycopg import sql

from conveyor.db.database import Database, retry_delay
from conveyor.service import BackgroundService

log = logging.getLogger("conveyor.control")

Tick = Callable[[psycopg.AsyncConnection[Any]], Awaitable[object]]


def jobs_channel(schema: str) -> str:
    """The channel announcing newly available jobs (payload: the queue)."""
    return f"{schema}.jobs"


def control_channel(schema: str) -> str:
    """The channel for worker signals (payload: JSON with `kind`)."""
    return f"{schema}.control"


class ControlSession(BackgroundService):
    """LISTENs on `channels` (when `listen`) and calls `on_tick(conn)` every `tick_s`.

    A channel's handler gets each notification's payload and the process id
    of the backend that sent it.
    """

    name = "control"

    def __init__(
        self,
        db: Database,
        *,
        channels: Mapping[str, Callable[[str, int], None]],
        on_reconnect: Callable[[], None],
        on_tick: Tick,
        tick_s: float,
        listen: bool = True,
    ) -> None:
        super().__init__()
        self._db = db
        self._channels = dict(channels)
        self._on_reconnect = on_reconnect
        self._on_tick = on_tick
        self._tick_s = tick_s
        self._listen = listen
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.connected = asyncio.Event()
        """Set while the session is connected (and listening, when it listens)."""

    @property
    def connection(self) -> psycopg.AsyncConnection[Any] | None:
        """The live connection, for tests that want to break it."""
        return self._conn

    async def stop(self) -> None:
        """Stop and close the connection."""
        await super().stop()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def _run(self) -> None:
        failures = 0
        first = True
        while True:
            try:
                await self._session(announce=not first)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected.clear()
                delay = retry_delay(min(failures, 6))
                failures += 1
                log.warning("control connection lost (%s); reconnecting in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                first = False
                continue
            failures = 0

    async def _session(self, *, announce: bool) -> None:
        conninfo = await asyncio.to_thread(lambda: self._db.session_conninfo)
        conn = await psycopg.AsyncConnection.connect(
            conninfo,
            autocommit=True,
            **self._db.connect_kwargs("conveyor-control", conninfo=conninfo),
        )
        self._conn = conn
        try:
            if self._listen:
                for channel in self._channels:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self.connected.set()
            if announce:
                self._on_reconnect()
            await self._serve(conn)
        finally:
            self.connected.clear()
            self._conn = None
            await conn.close()

    async def _serve(self, conn: psycopg.AsyncConnection[Any]) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self._tick_s
        while True:
            wait = next_tick - loop.time()
            if wait > 0:
                if self._listen:
                    async for note in conn.notifies(timeout=wait):
                        self._dispatch(note.channel, note.payload, note.pid)
                else:
                    await asyncio.sleep(wait)
            if loop.time() >= next_tick:
                try:
                    await self._on_tick(conn)
                except Exception as exc:
                    if conn.broken or conn.closed:
                        raise
                    log.warning("control tick failed: %s", exc)
                next_tick = loop.time() + self._tick_s

    def _dispatch(self, channel: str, payload: str, pid: int) -> None:
        handler = self._channels.get(channel)
        if handler is None:
            return
        try:
            handler(payload, pid)
        except Exception:
            log.exception("handler for %s failed on %r", channel, payload)
