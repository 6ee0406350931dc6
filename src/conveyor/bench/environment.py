"""Where a benchmark runs: a fresh database per run, and what the machine is.

Every scenario run gets a database of its own (created from `template0`,
dropped afterwards), so no run sees another's rows, dead tuples or caches of
its tables. The server is `CONVEYOR_DATABASE_URL`, else the embedded one.
"""

from __future__ import annotations

import os
import platform
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from conveyor.config import Config
from conveyor.db.connect import resolve_database_url
from conveyor.event_loop import loop_name

SETTINGS = (
    "server_version",
    "shared_buffers",
    "synchronous_commit",
    "fsync",
    "max_connections",
    "work_mem",
    "wal_level",
)
"""PostgreSQL settings every result records: they change what a number means."""


def server_url() -> str:
    """The PostgreSQL server to benchmark on."""
    return resolve_database_url(Config.from_env())


@contextmanager
def fresh_database(server: str, label: str = "bench") -> Iterator[str]:
    """A new empty database on `server` for one run; dropped afterwards."""
    name = f"conveyor_{label}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(server, dbname=name)
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def machine(server: str) -> dict[str, Any]:
    """The machine and server a result was measured on."""
    with psycopg.connect(server, autocommit=True) as conn:
        settings = {
            name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]  # type: ignore[index]
            for name in SETTINGS
        }
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "event_loop": loop_name(),
        "embedded_postgres": not os.environ.get("CONVEYOR_DATABASE_URL"),
        "postgres": settings,
    }
