"""A PgBouncer of our own, in transaction mode, in front of a PostgreSQL server.

The pooler tests and `python -m benchmarks.pgbouncer_check` start one on a
free port. The binary comes from the system (Debian: `apt-get install
pgbouncer`); it is not on PyPI.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict, make_conninfo

START_TIMEOUT_S = 10.0
START_POLL_S = 0.05

_INI = """\
[databases]
* = host={host} port={port} user={user}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
auth_type = trust
auth_file = {dir}/users.txt
pool_mode = transaction
max_client_conn = 500
default_pool_size = {pool_size}
logfile = {dir}/pgbouncer.log
pidfile = {dir}/pgbouncer.pid
unix_socket_dir =
ignore_startup_parameters = extra_float_digits,options,application_name
"""


BINARY_ENV = "CONVEYOR_PGBOUNCER"
"""Path of the `pgbouncer` executable to use instead of the one on PATH (say a
1.21+ built from source, next to the distribution's older package)."""


def pgbouncer_binary() -> str | None:
    """The path of the `pgbouncer` executable (`CONVEYOR_PGBOUNCER`, else on PATH,
    else Debian's), or None when it is not installed."""
    if chosen := os.environ.get(BINARY_ENV):
        return chosen
    found = shutil.which("pgbouncer")
    if found:
        return found
    debian = Path("/usr/sbin/pgbouncer")
    return str(debian) if debian.exists() else None


@dataclass(frozen=True)
class PgBouncer:
    """A running PgBouncer: `url(database_url)` reaches the same database through it."""

    port: int
    version: str
    log_path: Path
    max_prepared_statements: int = 0
    """As configured: above 0 (PgBouncer 1.21+), clients keep server-side prepared
    statements across the server sessions they are given."""

    def url(self, database_url: str) -> str:
        """`database_url` with host and port replaced by this pooler's."""
        params = conninfo_to_dict(database_url)
        params.pop("password", None)
        return make_conninfo("", **{**params, "host": "127.0.0.1", "port": str(self.port)})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(START_POLL_S)
    log = log_path.read_text(errors="replace") if log_path.exists() else ""
    raise RuntimeError(f"pgbouncer did not listen on port {port} within {START_TIMEOUT_S}s:\n{log}")


def version_of(binary: str) -> tuple[int, int]:
    """(major, minor) of a `pgbouncer` executable, from `--version`."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    major, minor = out.stdout.split()[1].split(".")[:2]
    return int(major), int(minor)


PREPARED_STATEMENTS_SINCE = (1, 21)
"""The first PgBouncer that keeps clients' prepared statements in transaction mode."""


@contextmanager
def running_pgbouncer(
    server_url: str, *, pool_size: int = 10, max_prepared_statements: int = 0
) -> Iterator[PgBouncer]:
    """Run a transaction-mode PgBouncer in front of `server_url` while the block runs.

    `pool_size` server connections per database and user: few enough that
    clients really share server sessions, as they do in production.
    `max_prepared_statements` (PgBouncer 1.21+; 0: off) lets clients keep
    server-side prepared statements.
    """
    binary = pgbouncer_binary()
    if binary is None:
        raise RuntimeError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    server = conninfo_to_dict(server_url)
    port = _free_port()
    with tempfile.TemporaryDirectory(
        prefix="conveyor-pgbouncer-", ignore_cleanup_errors=True
    ) as tmp:
        yield from _run(binary, Path(tmp), server, port, pool_size, max_prepared_statements)


def _run(
    binary: str,
    workdir: Path,
    server: dict[str, Any],
    port: int,
    pool_size: int,
    max_prepared_statements: int,
) -> Iterator[PgBouncer]:
    user = server.get("user") or "postgres"
    (workdir / "users.txt").write_text(f'"{user}" ""\n')
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        _INI.format(
            host=server.get("host") or "127.0.0.1",
            port=server.get("port") or 5432,
            user=user,
            listen=port,
            dir=workdir,
            pool_size=pool_size,
        )
        + _prepared_statements_line(max_prepared_statements)
    )
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    command = [binary, "-d", str(ini)]
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root; the temporary directory sits in a
        # directory every user may enter.
        os.chmod(workdir, 0o777)
        command = ["su", _unprivileged_user(server), "-s", "/bin/sh", "-c", " ".join(command)]
    subprocess.run(command, check=True)
    log_path = workdir / "pgbouncer.log"
    try:
        _wait_listening(port, log_path)
        yield PgBouncer(
            port=port,
            version=version.stdout.splitlines()[0],
            log_path=log_path,
            max_prepared_statements=max_prepared_statements,
        )
    finally:
        pid_file = workdir / "pgbouncer.pid"
        if pid_file.exists():
            _stop(int(pid_file.read_text().strip()))


def _prepared_statements_line(limit: int) -> str:
    # Only when asked: PgBouncer before 1.21 refuses the setting.
    return f"max_prepared_statements = {limit}\n" if limit else ""


def _unprivileged_user(server: dict[str, Any]) -> str:
    """Who runs PgBouncer when we are root: the owner of the server's socket
    directory if it is reached by one (the embedded server's user, for one,
    whose data directory nobody else may enter), else `postgres`."""
    host = server.get("host") or ""
    if host.startswith("/") and Path(host).is_dir():
        owner = pwd.getpwuid(Path(host).stat().st_uid).pw_name
        if owner != "root":
            return owner
    return "postgres"


def _stop(pid: int) -> None:
    """SIGTERM the daemon (it may run as another user: `kill` has the rights we
    have) and wait until it has exited."""
    subprocess.run(["kill", str(pid)], check=False, capture_output=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(START_POLL_S)
