"""Test infrastructure: a PostgreSQL server, a migrated template, a database per test.

`CONVEYOR_TEST_DATABASE_URL` points at a server the tests may create databases
on (CI uses the machine's PostgreSQL). Without it the embedded PostgreSQL is
started, so a laptop with nothing installed runs the whole suite too.

Each test gets its own database cloned from a migrated template (tens of
milliseconds), so tests are isolated and safe to run in parallel.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from conveyor import App
from conveyor.embedded import embedded_database_url
from conveyor.migrations.migrator import available_migrations, migrate

ENV_TEST_URL = "CONVEYOR_TEST_DATABASE_URL"
SCHEMA = "conveyor"


def _server_url() -> str:
    if url := os.environ.get(ENV_TEST_URL):
        return url
    data_dir = Path(os.environ.get("CONVEYOR_TEST_EMBEDDED_DIR", "/tmp/conveyor-test-pgdata"))
    return embedded_database_url(data_dir)


def _with_database(url: str, dbname: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


def _template_name() -> str:
    digest = hashlib.sha256()
    for migration in available_migrations():
        digest.update(migration.text.encode())
    return f"conveyor_tmpl_{digest.hexdigest()[:12]}"


@pytest.fixture(scope="session")
def server_url() -> str:
    """Admin URL of the test server."""
    return _server_url()


@pytest.fixture(scope="session")
def template_db(server_url: str) -> str:
    """A database migrated to the latest schema, built once per migration set."""
    name = _template_name()
    with psycopg.connect(server_url, autocommit=True) as admin:
        # Serialises xdist workers building the same template.
        admin.execute("SELECT pg_advisory_lock(hashtext(%s))", (name,))
        try:
            exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone() is None:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                migrate(_with_database(server_url, name), SCHEMA)
        finally:
            admin.execute("SELECT pg_advisory_unlock(hashtext(%s))", (name,))
    return name


@pytest.fixture
def database_url(server_url: str, template_db: str) -> Iterator[str]:
    """URL of a fresh, migrated database for this test only."""
    name = f"conveyor_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    yield _with_database(server_url, name)
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[App]:
    """An App on this test's database, with no tasks registered."""
    instance = App(database_url, schema=SCHEMA)
    yield instance
    await instance.close()
    instance.db.close_sync()
