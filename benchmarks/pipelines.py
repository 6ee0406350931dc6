"""Throughput of pipeline steps: runs of N no-op steps through one in-process worker.

    python benchmarks/pipelines.py --runs 1000 --steps 5 --concurrency 20

Every step is a job whose completion enqueues the next step in the same
transaction (the database trigger of migration 0009), so this measures the
whole chain: claim, load the run, execute, record, advance. Uses
CONVEYOR_DATABASE_URL, else the embedded PostgreSQL, in a scratch schema that
it drops first. Prints one JSON object.
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


async def run(runs: int, steps: int, concurrency: int) -> dict[str, object]:
    url = resolve_database_url(Config.from_env())
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
        server = conn.execute("SHOW server_version").fetchone()
    app = App(url, schema=SCHEMA)
    await app.migrate()
    pipe = app.pipeline("bench")

    async def noop(ctx: JobContext) -> None:
        return None

    for i in range(steps):
        pipe.step(name=f"s{i}")(noop)

    t0 = time.perf_counter()
    started = [await pipe.start({"i": i}) for i in range(runs)]
    start_s = time.perf_counter() - t0

    worker = Worker(app, WorkerConfig(concurrency=concurrency, poll_interval=timedelta(seconds=1)))
    total_steps = runs * steps
    t1 = time.perf_counter()
    await worker.start()
    while worker.stats.succeeded < total_steps:  # noqa: ASYNC110 - sampling, not waiting
        await asyncio.sleep(0.005)
    await worker.wait_until_idle()
    run_s = time.perf_counter() - t1
    await worker.stop()
    counts = await app.runs.counts()
    await app.close()
    assert counts == {"bench": {"succeeded": runs}}, counts
    assert len(started) == runs
    return {
        "scenario": "pipelines",
        "runs": runs,
        "steps_per_run": steps,
        "concurrency": concurrency,
        "worker_processes": 1,
        "starts_per_s": round(runs / start_s),
        "steps_per_s": round(total_steps / run_s),
        "runs_per_s": round(runs / run_s, 1),
        "seconds": round(run_s, 3),
        "postgres": server[0] if server else None,
        "embedded": not os.environ.get("CONVEYOR_DATABASE_URL"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1_000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.runs, args.steps, args.concurrency))))


if __name__ == "__main__":
    main()
