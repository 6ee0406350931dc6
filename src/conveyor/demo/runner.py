"""`conveyor demo`: migrate, enqueue a mixed workload, run worker processes, summarise."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta

import psycopg
from psycopg import sql
from rich.console import Console
from rich.table import Table

from conveyor.app import App
from conveyor.cli.progress import progress_bar
from conveyor.config import ENV_DATABASE_URL, ENV_SCHEMA, Config
from conveyor.db.connect import resolve_database_url
from conveyor.errors import ConveyorError
from conveyor.tasks import JobSpec

DEMO_TIMEOUT_S = 60.0
POLL_S = 0.2
WORKER_CONCURRENCY = 10


def run_demo(console: Console, *, jobs: int, workers: int, database_url: str | None) -> None:
    """Run the whole demo, printing progress and a summary table."""
    from conveyor.demo import DEMO_SCHEMA, app

    url = resolve_database_url(Config.from_env(database_url=database_url))
    where = "embedded PostgreSQL" if not (database_url or os.environ.get(ENV_DATABASE_URL)) else url
    console.print(f"[bold]conveyor demo[/] on {where}, schema [cyan]{DEMO_SCHEMA}[/]")
    _reset_schema(url, DEMO_SCHEMA)
    demo_app = App(url, schema=DEMO_SCHEMA)
    demo_app.tasks = app.tasks
    demo_app.migrate_sync()
    specs = _workload(demo_app, jobs)
    demo_app.enqueue_many_sync(specs)
    orders = max(1, jobs // 20)
    _start_orders(demo_app, orders)
    console.print(
        f"enqueued {len(specs)} jobs and started {orders} order pipeline runs; "
        f"starting {workers} worker processes"
    )
    started = time.perf_counter()
    procs = [_start_worker(url, DEMO_SCHEMA) for _ in range(workers)]
    try:
        _follow(console, url, DEMO_SCHEMA, procs)
    finally:
        _stop_workers(procs)
    elapsed = time.perf_counter() - started
    _summarise(console, url, DEMO_SCHEMA, elapsed)
    demo_app.db.close_sync()


def _start_orders(app: App, count: int) -> None:
    from conveyor.demo import fulfil_order

    # The pipeline was declared on the module's app; start runs on this one.
    rng = random.Random(7)
    fulfil_order.app = app
    for order_id in range(count):
        fulfil_order.start_sync(
            {"order_id": order_id, "items": rng.randint(1, 5), "cents": rng.randint(100, 50_000)},
            metadata={"triggered_by": "conveyor demo"},
        )


def _reset_schema(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _workload(app: App, count: int) -> list[JobSpec]:
    rng = random.Random(42)
    specs: list[JobSpec] = []
    for i in range(count):
        roll = rng.random()
        if roll < 0.4:
            spec = app.tasks["resize_image"].job(image_id=i, width=rng.choice([320, 640, 1280]))
        elif roll < 0.7:
            spec = app.tasks["send_email"].job(to=f"customer{i}@example.com")
        elif roll < 0.95:
            spec = app.tasks["charge_card"].job(order_id=i, cents=rng.randint(100, 50_000))
        else:
            spec = app.tasks["sync_inventory"].job(sku=f"SKU-{i}")
        if rng.random() < 0.1:
            spec = _delayed(spec, timedelta(seconds=rng.uniform(0.5, 3.0)))
        specs.append(spec)
    return specs


def _delayed(spec: JobSpec, delay: timedelta) -> JobSpec:
    from dataclasses import replace

    return replace(spec, delay=delay)


def _start_worker(url: str, schema: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, ENV_DATABASE_URL: url, ENV_SCHEMA: schema}
    command = [
        sys.executable, "-m", "conveyor", "worker", "conveyor.demo:app",
        "--concurrency", str(WORKER_CONCURRENCY), "--poll-interval", "0.2",
        "--log-level", "error",
    ]  # fmt: skip
    return subprocess.Popen(command, env=env)


def _follow(console: Console, url: str, schema: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    with progress_bar(console) as progress:
        bar = progress.add_task("jobs finished")
        while True:
            finished, total, live_runs = _progress(url, schema)
            progress.update(bar, completed=finished, total=total)
            if finished >= total and live_runs == 0:
                return
            if time.monotonic() > deadline:
                raise ConveyorError(f"demo did not finish within {DEMO_TIMEOUT_S:.0f}s")
            if all(p.poll() is not None for p in procs):
                raise ConveyorError("every worker process exited early")
            time.sleep(POLL_S)


def _progress(url: str, schema: str) -> tuple[int, int, int]:
    """Jobs finished, jobs in all (pipeline steps appear as runs advance), live runs."""
    query = sql.SQL(
        "SELECT count(*) FILTER (WHERE state IN ('succeeded', 'failed', 'cancelled')),"
        " count(*), (SELECT count(*) FROM {}.runs WHERE state IN ('waiting', 'running'))"
        " FROM {}.jobs"
    ).format(sql.Identifier(schema), sql.Identifier(schema))
    with psycopg.connect(url) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def _stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _summarise(console: Console, url: str, schema: str, elapsed: float) -> None:
    query = sql.SQL(
        "SELECT task, state::text, count(*), sum(attempt - 1) FILTER (WHERE attempt > 1),"
        " sum(jsonb_array_length(errors)) FROM {}.jobs GROUP BY task, state ORDER BY task, state"
    ).format(sql.Identifier(schema))
    with psycopg.connect(url) as conn:
        rows = conn.execute(query).fetchall()
    table = Table(title="conveyor demo summary")
    for column in ("task", "state", "jobs", "retries", "errors recorded"):
        table.add_column(column, justify="left" if column in ("task", "state") else "right")
    total = retries = 0
    for task, state, count, retried, errors in rows:
        table.add_row(task, state, str(count), str(retried or 0), str(errors or 0))
        total += count
        retries += retried or 0
    console.print(table)
    runs_query = sql.SQL(
        "SELECT state::text, count(*) FROM {}.runs GROUP BY state ORDER BY state"
    ).format(sql.Identifier(schema))
    with psycopg.connect(url) as conn:
        by_state = ", ".join(f"{n} {state}" for state, n in conn.execute(runs_query).fetchall())
    console.print(
        f"order pipeline runs: {by_state} (a declined card fails its run; "
        "its cleanup released the stock once)"
    )
    console.print(
        f"[bold]{total}[/] jobs finished in [bold]{elapsed:.1f}s[/] with {retries} retries "
        "(wall time includes the delayed jobs and retry backoffs; `make bench` measures throughput)"
    )
