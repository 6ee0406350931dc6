"""The `conveyor` command line: thin commands over the public API."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
import threading
from datetime import timedelta
from typing import Annotated, Any

import typer
from rich.logging import RichHandler
from rich.table import Table

from conveyor.app import App
from conveyor.cli.bench import bench
from conveyor.cli.common import (
    DatabaseUrl,
    Schema,
    app_from_options,
    console,
    err_console,
    fail,
    run,
)
from conveyor.cli.loader import load_app
from conveyor.cli.partitions import partitions_cli
from conveyor.cli.runs import runs_cli
from conveyor.config import WorkerConfig
from conveyor.errors import ConveyorError
from conveyor.event_loop import loop_factory
from conveyor.jobs import JobState, KeyStats, QueueStats, WorkerInfo
from conveyor.locks.advisory import LockInfo
from conveyor.maintenance.pruner import PruneReport
from conveyor.worker.worker import Worker

cli = typer.Typer(
    name="conveyor",
    help="conveyor: a PostgreSQL-native durable job queue and pipeline engine.",
    no_args_is_help=True,
    add_completion=False,
)
cli.add_typer(runs_cli, name="runs")
cli.add_typer(partitions_cli, name="partitions")
cli.command()(bench)
STATE_ORDER = [s.value for s in JobState]


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=True)],
    )


@cli.command()
def migrate(database_url: DatabaseUrl = None, schema: Schema = None) -> None:
    """Create or upgrade conveyor's schema (safe to run concurrently)."""
    app = app_from_options(database_url, schema)
    try:
        applied = app.migrate_sync()
    except ConveyorError as exc:
        raise fail(exc) from None
    if applied:
        console.print(f"applied migrations {', '.join(map(str, applied))} to {app.config.schema}")
    else:
        console.print(f"schema {app.config.schema} is up to date")


@cli.command()
def worker(
    app_path: Annotated[str, typer.Argument(help="The App to run, as 'package.module:app'.")],
    queues: Annotated[str, typer.Option(help="Comma-separated queues to work.")] = "default",
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs run at once.")] = 10,
    poll_interval: Annotated[float, typer.Option(help="Fallback poll, seconds.")] = 1.0,
    shutdown_grace: Annotated[float, typer.Option(help="Grace on stop, seconds.")] = 10.0,
    listen: Annotated[
        bool,
        typer.Option(
            "--listen/--no-listen",
            help="LISTEN for wake-ups; --no-listen behind a transaction-mode pooler "
            "when CONVEYOR_SESSION_URL gives no direct connection.",
        ),
    ] = True,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "info",
    loop: Annotated[
        str,
        typer.Option(
            envvar="CONVEYOR_EVENT_LOOP",
            help="Event loop: auto (uvloop where installed), uvloop or asyncio.",
        ),
    ] = "auto",
) -> None:
    """Run a worker until SIGINT/SIGTERM, then shut down gracefully."""
    _setup_logging(log_level)
    try:
        loop_factory(loop)  # a bad choice fails before the app is imported
        app = load_app(app_path)
        config = WorkerConfig(
            queues=tuple(q.strip() for q in queues.split(",") if q.strip()),
            concurrency=concurrency,
            poll_interval=timedelta(seconds=poll_interval),
            shutdown_grace=timedelta(seconds=shutdown_grace),
            listen=listen,
        )
    except ConveyorError as exc:
        raise fail(exc) from None
    run(lambda: _work(app, config), loop=loop)
    _exit_despite_stuck_threads()


def _exit_despite_stuck_threads() -> None:
    """Exit now if a sync task ignored `ctx.cancelled` and still holds a thread.

    Its job was already handed back (or will be rescued), and Python would
    otherwise wait for the thread at interpreter exit, keeping a stopped worker
    alive for as long as the task runs.
    """
    pool_threads = [t for t in threading.enumerate() if t.name.startswith("conveyor-task")]
    for thread in pool_threads:
        thread.join(timeout=0.2)  # idle pool threads exit on their own at once
    stuck = [t for t in pool_threads if t.is_alive()]
    if stuck:
        _exit_now(f"worker stopped; abandoning {len(stuck)} sync task thread(s)")


def _exit_now(message: str) -> None:
    """Exit 0 at once: everything was flushed, only abandoned attempts remain."""
    err_console.print(message)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


async def _work(app: App, config: WorkerConfig) -> None:
    runner = Worker(app, config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, runner.request_stop)
    try:
        await runner.run()
    finally:
        await app.close()
    if runner.leaked_slots:
        # An attempt that ignores cancellation would keep asyncio.run (which waits
        # for every task) or the interpreter (which joins threads) from exiting.
        _exit_now(f"worker stopped; abandoning {runner.leaked_slots} leaked attempt(s)")


@cli.command()
def enqueue(
    app_path: Annotated[str, typer.Argument(help="The App, as 'package.module:app'.")],
    task: Annotated[str, typer.Argument(help="Registered task name.")],
    args: Annotated[str, typer.Option("--args", help="Arguments as a JSON object.")] = "{}",
    queue: Annotated[str | None, typer.Option(help="Override the task's queue.")] = None,
    priority: Annotated[int | None, typer.Option(help="Override the priority.")] = None,
    delay: Annotated[float | None, typer.Option(help="Run after this many seconds.")] = None,
) -> None:
    """Enqueue one job and print it as JSON."""
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as exc:
        raise fail(ValueError(f"--args is not valid JSON: {exc}")) from None
    if not isinstance(parsed, dict):
        raise fail(ValueError("--args must be a JSON object"))
    options: dict[str, Any] = {}
    if queue is not None:
        options["queue"] = queue
    if priority is not None:
        options["priority"] = priority
    if delay is not None:
        options["delay"] = timedelta(seconds=delay)
    try:
        app = load_app(app_path)
    except ConveyorError as exc:
        raise fail(exc) from None
    try:
        job = app.enqueue_sync(task, parsed, **options)
    except ConveyorError as exc:
        raise fail(exc) from None
    finally:
        app.db.close_sync()
    console.print_json(
        json.dumps({"id": job.id, "task": job.task, "queue": job.queue, "state": job.state})
    )


@cli.command()
def status(database_url: DatabaseUrl = None, schema: Schema = None) -> None:
    """Show job counts per queue and state."""
    app = app_from_options(database_url, schema)

    async def read() -> tuple[dict[str, dict[str, int]], list[WorkerInfo]]:
        try:
            return await app.counts(), await app.workers(live_only=True)
        finally:
            await app.close()

    counts, workers = run(read)
    table = Table(title=f"conveyor jobs ({app.config.schema})")
    table.add_column("queue")
    for state in STATE_ORDER:
        table.add_column(state, justify="right")
    for queue_name, by_state in sorted(counts.items()):
        table.add_row(queue_name, *(str(by_state.get(s, 0)) for s in STATE_ORDER))
    if not counts:
        table.add_row("(no jobs)", *("0" for _ in STATE_ORDER))
    console.print(table)
    live = [w for w in workers if w.state in ("running", "stopping")]
    leaked = sum(w.leaked_slots for w in live)
    console.print(
        f"workers: {len(live)} live, {sum(w.running_jobs for w in live)} jobs running, "
        f"{leaked} leaked slot(s)"
        + (" [bold red](attempts ignoring cancellation)[/]" if leaked else "")
    )


workers_cli = typer.Typer(help="List and stop worker processes.", no_args_is_help=False)
cli.add_typer(workers_cli, name="workers")


@workers_cli.callback(invoke_without_command=True)
def workers_list(
    ctx: typer.Context,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
    all_workers: Annotated[
        bool, typer.Option("--all", help="Include stopped and dead workers.")
    ] = False,
) -> None:
    """List workers: state, heartbeat age, running jobs, leaked slots, version."""
    if ctx.invoked_subcommand is not None:
        return
    app = app_from_options(database_url, schema)

    async def fetch() -> list[WorkerInfo]:
        try:
            return await app.workers(live_only=not all_workers)
        finally:
            await app.close()

    rows = run(fetch)
    table = Table(title=f"conveyor workers ({app.config.schema})")
    for column in ("id", "state", "heartbeat", "running", "leaked", "concurrency", "queues",
                   "version"):  # fmt: skip
        table.add_column(column, justify="right" if column in ("running", "leaked") else "left")
    for w in rows:
        table.add_row(
            w.id,
            w.state + (" (stop requested)" if w.stop_requested_at and w.state != "stopped" else ""),
            f"{w.heartbeat_age_s:.1f}s ago",
            str(w.running_jobs),
            str(w.leaked_slots),
            str(w.concurrency),
            ",".join(w.queues),
            f"{w.version} (schema {w.schema_version})",
        )
    console.print(table)


@workers_cli.command("stop")
def workers_stop(
    worker_id: Annotated[
        str | None, typer.Argument(help="Worker id (see `conveyor workers`).")
    ] = None,
    all_workers: Annotated[bool, typer.Option("--all", help="Stop every live worker.")] = False,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Ask a worker (or all) to finish its running jobs and exit."""
    if (worker_id is None) == (not all_workers):
        raise fail(ValueError("give a worker id or --all (not both)"))
    app = app_from_options(database_url, schema)

    async def stop() -> list[str]:
        try:
            return await app.stop_workers(None if all_workers else worker_id)
        finally:
            await app.close()

    stopped = run(stop)
    if not stopped:
        raise fail(ValueError(f"no live worker {worker_id!r}" if worker_id else "no live worker"))
    for stopped_id in stopped:
        console.print(f"stop requested: {stopped_id}")


limits_cli = typer.Typer(help="Concurrency key limits.", no_args_is_help=True)
cli.add_typer(limits_cli, name="limits")


@limits_cli.command("set")
def limits_set(
    key: Annotated[str, typer.Argument(help="The concurrency key.")],
    limit: Annotated[int, typer.Argument(help="Most jobs of the key running at once.")],
    queue: Annotated[str, typer.Option(help="The key's queue.")] = "default",
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Change a key's concurrency limit; the next claim uses it."""
    app = app_from_options(database_url, schema)

    async def apply() -> KeyStats:
        try:
            return await app.set_limit(key, limit, queue=queue)
        finally:
            await app.close()

    stats = run(apply)
    console.print(
        f"{stats.queue}/{stats.key}: limit {stats.concurrency_limit} "
        f"({stats.running} running, {stats.waiting} waiting)"
    )


@cli.command()
def stats(
    queue: Annotated[str | None, typer.Option(help="Only this queue.")] = None,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Per-queue and per-key statistics kept by the database: waiting, running, totals."""
    app = app_from_options(database_url, schema)

    async def read() -> tuple[list[QueueStats], list[KeyStats]]:
        try:
            return await app.queue_stats(), await app.keys(queue=queue)
        finally:
            await app.close()

    queues, rows = run(read)
    per_queue = Table(title=f"conveyor queues ({app.config.schema})")
    for column in ("queue", "waiting", "running", "enqueued", "succeeded", "failed", "cancelled"):
        per_queue.add_column(column, justify="left" if column == "queue" else "right")
    for q in queues:
        if queue is None or q.queue == queue:
            per_queue.add_row(
                q.queue,
                *map(
                    str,
                    (q.waiting, q.running, q.total_enqueued, q.total_succeeded, q.total_failed,
                     q.total_cancelled),
                ),
            )  # fmt: skip
    console.print(per_queue)
    table = Table(title=f"conveyor concurrency keys ({app.config.schema})")
    columns = ("queue", "key", "limit", "waiting", "running", "enqueued", "succeeded", "failed",
               "cancelled")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("queue", "key") else "right")
    for k in rows:
        table.add_row(
            k.queue,
            k.key,
            *map(
                str,
                (k.concurrency_limit, k.waiting, k.running, k.total_enqueued, k.total_succeeded,
                 k.total_failed, k.total_cancelled),
            ),
        )  # fmt: skip
    console.print(table)


@cli.command()
def cancel(
    job_ids: Annotated[list[int], typer.Argument(help="Job ids to cancel.")],
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Cancel jobs: waiting ones at once, running ones via their worker."""
    app = app_from_options(database_url, schema)

    async def run_cancel() -> dict[int, str]:
        try:
            return await app.cancel_many(ids=job_ids)
        finally:
            await app.close()

    outcomes = run(run_cancel)
    for job_id in job_ids:
        console.print(
            f"job {job_id}: {outcomes.get(job_id, 'not cancellable (finished or unknown)')}"
        )


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r}: use a number and s, m, h or d (e.g. 7d, 12h)")
    return timedelta(**{_UNITS[match[2]]: float(match[1])})


@cli.command()
def prune(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Age of finished history to delete: 7d, 12h, 30m.")
    ],
    states: Annotated[
        list[str] | None,
        typer.Option("--state", help="Only these terminal states (repeatable); default all."),
    ] = None,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Delete finished jobs and pipeline runs older than --older-than, in batches."""
    age = _duration(older_than)
    app = app_from_options(database_url, schema)

    async def apply() -> PruneReport:
        try:
            return await app.prune(
                older_than=age, states=states or ["succeeded", "failed", "cancelled"]
            )
        finally:
            await app.close()

    report = run(apply)
    console.print(f"pruned {report.jobs} job(s) and {report.runs} run(s) older than {age}")


@cli.command()
def locks(database_url: DatabaseUrl = None, schema: Schema = None) -> None:
    """List the database's advisory locks: key, owner, holder pid and application, since."""
    app = app_from_options(database_url, schema)

    async def fetch() -> list[LockInfo]:
        try:
            return await app.list_locks()
        finally:
            await app.close()

    rows = run(fetch)
    table = Table(title=f"advisory locks ({app.config.schema})")
    for column in ("key", "owner", "pid", "application", "state", "since", "id"):
        table.add_column(column)
    for lock in rows:
        ident = f"{lock.classid}/{lock.objid}/{lock.objsubid}"
        table.add_row(
            lock.key or "(not taken through conveyor)",
            lock.owner or "",
            str(lock.pid),
            lock.application_name or "",
            "held" if lock.granted else "waiting",
            lock.since.isoformat(timespec="seconds") if lock.since else "",
            ident,
        )
    if not rows:
        table.add_row("(no advisory locks)", "", "", "", "", "", "")
    console.print(table)


@cli.command()
def demo(
    jobs: Annotated[int, typer.Option(min=10, help="How many jobs to enqueue.")] = 400,
    workers: Annotated[int, typer.Option(min=1, max=8, help="Worker processes.")] = 2,
    database_url: DatabaseUrl = None,
) -> None:
    """Enqueue a sample workload, run worker processes, and summarise (under a minute)."""
    from conveyor.demo.runner import run_demo

    try:
        run_demo(console, jobs=jobs, workers=workers, database_url=database_url)
    except ConveyorError as exc:
        raise fail(exc) from None


def main() -> None:
    """Entry point of the `conveyor` script."""
    cli()
