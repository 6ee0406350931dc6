"""Throughput with and without concurrency keys, in the same run (the cost of keys).

    python benchmarks/keys.py --jobs 10000 --limit 10

Plain: no-op jobs without keys. Keyed: the same jobs in one key with `limit`.
One in-process worker, concurrency 20. Uses CONVEYOR_DATABASE_URL, else the
embedded PostgreSQL, in a scratch schema dropped first. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import timedelta

import psycopg
from psycopg import sql

from conveyor import App, JobContext, Worker, WorkerConfig
from conveyor.config import Config
from conveyor.db.connect import resolve_database_url

SCHEMA = "conveyor_bench_keys"


async def _run(url: str, jobs: int, limit: int | None) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    app = App(url, schema=SCHEMA)
    await app.migrate()

    @app.task(name="noop", concurrency_limit=limit)
    async def noop(ctx: JobContext) -> None:
        return None

    await app.enqueue_many([noop.job() for _ in range(jobs)])
    worker = Worker(app, WorkerConfig(concurrency=20, poll_interval=timedelta(seconds=1)))
    started = time.perf_counter()
    await worker.start()
    while worker.stats.succeeded < jobs:  # noqa: ASYNC110 - sampling, not waiting on an event
        await asyncio.sleep(0.005)
    await worker.wait_until_idle()
    seconds = time.perf_counter() - started
    await worker.stop()
    await app.close()
    return seconds


async def main(jobs: int, limit: int) -> dict[str, object]:
    url = resolve_database_url(Config.from_env())
    plain = await _run(url, jobs, None)
    keyed = await _run(url, jobs, limit)
    return {
        "scenario": "keys",
        "jobs": jobs,
        "limit": limit,
        "plain_jobs_per_s": round(jobs / plain),
        "keyed_jobs_per_s": round(jobs / keyed),
        "keyed_vs_plain": round(plain / keyed, 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--limit", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.jobs, args.limit))))
