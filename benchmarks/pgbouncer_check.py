"""A worker through PgBouncer in transaction mode: what works, measured.

    python -m benchmarks.pgbouncer_check [--jobs 5000] [--concurrency 20]

Needs the `pgbouncer` binary (Debian: `apt-get install pgbouncer`; or the one
`CONVEYOR_PGBOUNCER` names). Starts a PgBouncer of its own on a free port, in
transaction mode (with `max_prepared_statements` on 1.21+, which adds a run
that keeps prepared statements), in front of the benchmark server
(`CONVEYOR_DATABASE_URL`, else the embedded PostgreSQL), on a fresh database;
prints one JSON report. docs/operations.md quotes it; the
behaviour itself is proven by tests/pooler.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import timedelta
from typing import Any

from conveyor import Worker, WorkerConfig
from conveyor.bench.environment import fresh_database, server_url
from conveyor.bench.pgbouncer import (
    PREPARED_STATEMENTS_SINCE,
    PgBouncer,
    pgbouncer_binary,
    running_pgbouncer,
    version_of,
)
from conveyor.bench.sample import NOOP, build_app
from conveyor.config import Config
from conveyor.errors import LockError
from conveyor.event_loop import run as run_loop


async def _check(
    label: str, config: Config, jobs: int, concurrency: int, listen: bool
) -> dict[str, Any]:
    app = build_app(config=config)
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
            session_lock = "granted"
    except LockError as exc:
        session_lock = f"refused: {exc}"
    async with app.db.connection() as conn, conn.transaction():
        xact_lock = await app.xact_lock(conn, "pgbouncer-check-xact", timeout=1)
    await app.close()
    return {
        "run": label,
        "listen": listen,
        "prepare_threshold": config.prepare_threshold,
        "jobs": jobs,
        "succeeded": worker.stats.succeeded,
        "jobs_per_s_start_to_stop": round(jobs / seconds),
        "session_lock": session_lock,
        "xact_lock": xact_lock,
    }


async def _runs(server: str, bouncer: PgBouncer, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The same worker direct and through PgBouncer, each on a fresh database."""
    runs = []
    labels = ["direct", "direct, no prepared statements", "pgbouncer", "pgbouncer + session_url"]
    if bouncer.max_prepared_statements:
        labels.append("pgbouncer, prepared statements")
    for label in labels:
        with fresh_database(server) as direct:
            migrated = build_app(direct)
            await migrated.migrate()
            await migrated.close()
            pooled = label.startswith("pgbouncer")
            config = Config(
                database_url=bouncer.url(direct) if pooled else direct,
                prepare_threshold=5 if label.endswith(("direct", "prepared statements")) else None,
                session_url=direct if label.endswith("session_url") else None,
            )
            listen = not pooled or config.session_url is not None
            runs.append(await _check(label, config, args.jobs, args.concurrency, listen))
    return runs


def main(args: argparse.Namespace) -> None:
    """Start a PgBouncer, run the checks through it, stop it, print the report."""
    if pgbouncer_binary() is None:
        raise SystemExit("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    server = server_url()
    keeps = version_of(pgbouncer_binary() or "") >= PREPARED_STATEMENTS_SINCE
    with running_pgbouncer(server, max_prepared_statements=200 if keeps else 0) as bouncer:
        runs = run_loop(_runs(server, bouncer, args))
    print(json.dumps({"pgbouncer": bouncer.version, "runs": runs}, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=20)
    main(parser.parse_args())
