"""Throughput of no-op jobs through one in-process worker.

    python benchmarks/throughput.py --jobs 10000 --concurrency 10

Uses CONVEYOR_DATABASE_URL, else the embedded PostgreSQL, in a scratch schema
that it drops first. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from datetime import timedelta

import psycopg
from psycopg import sql

from conveyor import App, JobContext, Worker, WorkerConfig
from conveyor.config import Config
from conveyor.db.connect import resolve_database_url

SCHEMA = "conveyor_bench"


async def run(jobs: int, concurrency: int) -> dict[str, object]:
    url = resolve_database_url(Config.from_env())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
        server = conn.execute("SHOW server_version").fetchone()
    app = App(url, schema=SCHEMA)
    await app.migrate()

    @app.task(name="noop")
    async def noop(ctx: JobContext) -> None:
        return None

    t0 = time.perf_counter()
    await app.enqueue_many([noop.job() for _ in range(jobs)])
    enqueue_s = time.perf_counter() - t0

    worker = Worker(app, WorkerConfig(concurrency=concurrency, poll_interval=timedelta(seconds=1)))
    t1 = time.perf_counter()
    await worker.start()
    while worker.stats.succeeded < jobs:  # noqa: ASYNC110 - sampling, not waiting on an event
        await asyncio.sleep(0.005)
    await worker.wait_until_idle()
    run_s = time.perf_counter() - t1
    claims = worker.claims
    await worker.stop()
    counts = await app.counts()
    await app.close()
    assert counts == {"default": {"succeeded": jobs}}, counts
    return {
        "scenario": "throughput",
        "jobs": jobs,
        "concurrency": concurrency,
        "worker_processes": 1,
        "enqueue_many_jobs_per_s": round(jobs / enqueue_s),
        "jobs_per_s": round(jobs / run_s),
        "seconds": round(run_s, 3),
        "claims": claims,
        "postgres": server[0] if server else None,
        "embedded": not os.environ.get("CONVEYOR_DATABASE_URL"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.jobs, args.concurrency))))


if __name__ == "__main__":
    main()
