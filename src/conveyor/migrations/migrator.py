"""Apply the versioned `.sql` migrations shipped in this package.

Files are named `NNNN_name.sql`. `migrate` applies the pending ones in order,
each in its own transaction, all under one advisory lock so concurrent
migrators (ten workers starting at once) apply each migration exactly once,
through a transaction-mode pooler too.
A recorded checksum that no longer matches its file means someone edited an
applied migration: that is refused, never silently re-run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from conveyor.db.queries import schema_qualify
from conveyor.db.sqlstate import to_database_error
from conveyor.errors import SchemaVersionError
from conveyor.locks.keys import advisory_id

_FILE_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")

# Any constant works as long as every conveyor migrator uses the same one; the
# schema name is mixed in so apps in different schemas do not wait on each other.
_LOCK_NAMESPACE = "conveyor.migrate:"


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    text: str

    @property
    def checksum(self) -> str:
        """SHA-256 of the file as shipped (before the schema is swapped in)."""
        return hashlib.sha256(self.text.encode()).hexdigest()


@cache
def available_migrations() -> tuple[Migration, ...]:
    """Every migration shipped in the package, in version order."""
    found: list[Migration] = []
    for entry in resources.files("conveyor.migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise SchemaVersionError(f"migration versions must be 1..N without gaps, got {versions}")
    return tuple(found)


def latest_version() -> int:
    """The schema version this code was built for."""
    return available_migrations()[-1].version


def _schema(schema: str) -> sql.Identifier:
    return sql.Identifier(schema)


def applied_versions(conn: psycopg.Connection[Any], schema: str) -> dict[int, str]:
    """`{version: checksum}` of the migrations recorded in `schema` (empty if none)."""
    exists = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (f"{_quoted(schema)}.schema_migrations",)
    ).fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute(
        sql.SQL("SELECT version, checksum FROM {}.schema_migrations").format(_schema(schema))
    ).fetchall()
    return {int(version): str(checksum) for version, checksum in rows}


def migrate(conninfo: str, schema: str, *, target: int | None = None) -> list[int]:
    """Apply pending migrations up to `target` (default: all); return the versions applied.

    Raises `SchemaVersionError` for an unknown or altered schema and
    `DatabaseError` when PostgreSQL refuses a migration (it is rolled back whole).
    """
    try:
        return _migrate(conninfo, schema, target)
    except psycopg.Error as exc:
        raise to_database_error(f"migrate schema {schema!r}", exc, exhausted=False) from exc


def _migrate(conninfo: str, schema: str, target: int | None) -> list[int]:
    wanted = [m for m in available_migrations() if target is None or m.version <= target]
    applied_now: list[int] = []
    # The key's id as conveyor.locks computes it (the helper functions of
    # conveyor.locks live in the schema this may be about to create).
    lock_id = advisory_id(_LOCK_NAMESPACE + schema).single
    # The lock lives in a transaction kept open on a connection of its own, not
    # in a session: a session lock taken through a transaction-mode pooler
    # could be "released" on another server session and stay held forever on
    # its own; a transaction is never split, and whatever ends it (the end of
    # this function, a crash, a lost connection) ends the lock. Client-side
    # binding sends a simple query, which keeps no portal and so no snapshot
    # open while the migrations run.
    with (
        psycopg.connect(conninfo, cursor_factory=psycopg.ClientCursor) as lock_conn,
        psycopg.connect(conninfo, autocommit=True) as conn,
    ):
        lock_conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_id,))
        try:
            with conn.transaction():
                _ensure_bookkeeping(conn, schema)
            applied = applied_versions(conn, schema)
            _check_known(applied, schema)
            for migration in wanted:
                if migration.version not in applied:
                    _apply(conn, schema, migration)
                    applied_now.append(migration.version)
        finally:
            lock_conn.rollback()
    return applied_now


def _ensure_bookkeeping(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(_schema(schema)))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        ).format(_schema(schema))
    )


def _apply(conn: psycopg.Connection[Any], schema: str, migration: Migration) -> None:
    """One migration and its bookkeeping row, in one transaction: all or nothing."""
    with conn.transaction():
        conn.execute(sql.SQL(schema_qualify(migration.text, schema)))
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)"
            ).format(_schema(schema)),
            (migration.version, migration.name, migration.checksum),
        )


def check_schema(conninfo: str, schema: str) -> int:
    """Raise `SchemaVersionError` unless `schema` is exactly at this code's version."""
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            applied = applied_versions(conn, schema)
    except psycopg.Error as exc:
        raise to_database_error(f"check schema {schema!r}", exc, exhausted=False) from exc
    _check_known(applied, schema)
    current = max(applied, default=0)
    if current < latest_version():
        raise SchemaVersionError(
            f"schema {schema!r} is at version {current}, this conveyor needs "
            f"{latest_version()}: run `conveyor migrate`"
        )
    return current


def _check_known(applied: dict[int, str], schema: str) -> None:
    known = {m.version: m for m in available_migrations()}
    for version, checksum in sorted(applied.items()):
        migration = known.get(version)
        if migration is None:
            raise SchemaVersionError(
                f"schema {schema!r} is at version {max(applied)}, newer than this conveyor "
                f"understands ({latest_version()}): upgrade conveyor"
            )
        if migration.checksum != checksum:
            raise SchemaVersionError(
                f"migration {version:04d}_{migration.name} in schema {schema!r} was applied "
                "from a different file (checksum mismatch)"
            )


def _quoted(schema: str) -> str:
    return sql.Identifier(schema).as_string()
