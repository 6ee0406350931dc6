"""A worker through PgBouncer in transaction mode: what works, measured.

    python -m benchmarks.pgbouncer_check [--jobs 5000] [--concurrency 20]

Needs the `pgbouncer` binary (Debian: `apt-get install pgbouncer`; it is not on
PyPI, which is why this is a script and not part of `make test`). Starts a
PgBouncer of its own on a free port, in transaction mode, in front of the
benchmark server (`CONVEYOR_DATABASE_URL`, else the embedded PostgreSQL), on a
fresh database; prints one JSON report. docs/operations.md quotes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from conveyor import Worker, WorkerConfig
from conveyor.bench.environment import fresh_database, server_url
from conveyor.bench.sample import NOOP, build_app
from conveyor.config import Config
from conveyor.errors import LockError

INI = """\
[databases]
* = host={host} port={port} user={user}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen}
auth_type = trust
auth_file = {dir}/users.txt
pool_mode = transaction
max_client_conn = 200
default_pool_size = 10
logfile = {dir}/pgbouncer.log
pidfile = {dir}/pgbouncer.pid
unix_socket_dir =
ignore_startup_parameters = extra_float_digits,options,application_name
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_bouncer(binary: str, server: dict[str, Any], workdir: Path) -> int:
    listen = _free_port()
    user = server.get("user", "postgres")
    (workdir / "users.txt").write_text(f'"{user}" ""\n')
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        INI.format(
            host=server.get("host", "127.0.0.1"),
            port=server.get("port", 5432),
            user=user,
            listen=listen,
            dir=workdir,
        )
    )
    # PgBouncer refuses to run as root.
    command = [binary, "-d", str(ini)]
    if os.geteuid() == 0:
        os.chmod(workdir, 0o777)
        command = ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(command)]
    subprocess.run(command, check=True)
    for _ in range(100):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", listen)) == 0:
                return listen
        time.sleep(0.05)
    raise RuntimeError("pgbouncer did not start")


async def _check(url: str, jobs: int, concurrency: int, listen: bool) -> dict[str, Any]:
    app = build_app(url)
    app.config = Config(database_url=url, prepare_threshold=None)  # PgBouncer < 1.21
    app.db.config = app.config
    await app.enqueue_many([app.tasks[NOOP].job()] * jobs)
    worker = Worker(
        app,
        WorkerConfig(
            concurrency=concurrency, listen=listen, poll_interval=timedelta(milliseconds=200)
        ),
    )
    started = time.perf_counter()
    await worker.start()
    while worker.stats.succeeded < jobs:  # noqa: ASYNC110 - sampling progress
        await asyncio.sleep(0.02)
    await worker.wait_until_idle()
    await worker.stop()
    seconds = time.perf_counter() - started
    try:
        async with app.lock("pgbouncer-check", timeout=1):
            session_lock = "granted (unsafe through transaction pooling)"
    except LockError as exc:
        session_lock = f"refused: {exc}"
    async with app.db.connection() as conn, conn.transaction():
        xact_lock = await app.xact_lock(conn, "pgbouncer-check-xact", timeout=1)
    await app.close()
    return {
        "listen": listen,
        "jobs": jobs,
        "succeeded": worker.stats.succeeded,
        "seconds_start_to_stop": round(seconds, 3),
        "session_lock": session_lock,
        "xact_lock": xact_lock,
    }


async def _runs(server: str, listen: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for listen_flag in (False, True):
        with fresh_database(server) as direct:
            migrated = build_app(direct)
            await migrated.migrate()
            await migrated.close()
            params = conninfo_to_dict(direct)
            user = params.get("user", "postgres")
            bounced = f"postgresql://{user}@127.0.0.1:{listen}/{params['dbname']}"
            runs.append(await _check(bounced, args.jobs, args.concurrency, listen_flag))
    return runs


def main(args: argparse.Namespace) -> None:
    """Start a PgBouncer, run the checks through it, stop it, print the report."""
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise SystemExit("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    server = server_url()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        listen = _start_bouncer(binary, conninfo_to_dict(server), workdir)
        try:
            runs = asyncio.run(_runs(server, listen, args))
        finally:
            pid = (workdir / "pgbouncer.pid").read_text().strip()
            subprocess.run(["kill", pid], check=False)
    report = {"pgbouncer": version.stdout.splitlines()[0], "runs": runs}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=20)
    main(parser.parse_args())
