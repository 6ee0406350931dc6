"""`conveyor runs`: list, inspect, cancel and retry pipeline runs."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from conveyor.cli.common import DatabaseUrl, Schema, app_from_options, console, fail, run
from conveyor.runs import Run, RunState

runs_cli = typer.Typer(help="List, inspect, cancel and retry pipeline runs.")

RESULT_PREVIEW_CHARS = 60


@runs_cli.callback(invoke_without_command=True)
def runs_list(
    ctx: typer.Context,
    pipeline: Annotated[str | None, typer.Option(help="Only runs of this pipeline.")] = None,
    state: Annotated[
        str | None, typer.Option(help="Only runs in this state (waiting, running, ...).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many runs, newest first.")] = 20,
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """List recent runs with their state, key, step progress and age."""
    if ctx.invoked_subcommand is not None:
        return
    if state is not None and state not in {s.value for s in RunState}:
        raise fail(ValueError(f"unknown state {state!r}"))
    app = app_from_options(database_url, schema)

    async def fetch() -> list[Run]:
        try:
            return await app.runs.recent(
                pipeline=pipeline, state=state, limit=limit, with_steps=True
            )
        finally:
            await app.close()

    runs = run(fetch)
    table = Table(title=f"conveyor runs ({app.config.schema})")
    for column in ("id", "pipeline", "state", "key", "steps done", "failed step", "created"):
        table.add_column(column)
    for item in runs:
        done = sum(1 for s in item.steps if s.state == "succeeded")
        table.add_row(
            str(item.id),
            item.pipeline,
            item.state.value,
            item.key or "",
            f"{done}/{len(item.steps)}",
            item.failed_step or "",
            item.created_at.isoformat(timespec="seconds"),
        )
    if not runs:
        table.add_row("(no runs)", "", "", "", "", "", "")
    console.print(table)


@runs_cli.command("show")
def runs_show(
    run_id: Annotated[int, typer.Argument(help="Run id.")],
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Show one run: input, metadata, state, counters and every step."""
    app = app_from_options(database_url, schema)

    async def fetch() -> Run:
        try:
            return await app.runs.get(run_id)
        finally:
            await app.close()

    item = run(fetch)
    console.print(f"[bold]run {item.id}[/] of pipeline [bold]{item.pipeline}[/]: {item.state}")
    for label, value in (
        ("key", item.key),
        ("input", _preview(item.input, 200)),
        ("metadata", _preview(item.metadata, 200)),
        ("state", _preview(item.data, 200)),
        ("counters", item.counters or None),
        ("created", item.created_at),
        ("started", item.started_at),
        ("finished", item.finished_at),
        ("failed step", item.failed_step),
        ("error", (item.error or {}).get("message")),
        ("cleanup job", item.cleanup_job_id),
    ):
        if value is not None:
            console.print(f"  {label}: {value}")
    table = Table(title="steps")
    for column in ("step", "after", "state", "job", "attempts", "finished", "result / error"):
        table.add_column(column)
    for step in item.steps:
        state = step.state.value
        if step.state == "enqueued" and step.job_state:
            state = f"enqueued ({step.job_state})"
        outcome = (
            (step.error or {}).get("message", "")
            if step.error
            else _preview(step.result, RESULT_PREVIEW_CHARS)
        )
        table.add_row(
            step.name,
            ",".join(step.depends_on),
            state,
            str(step.job_id or ""),
            str(step.attempts),
            step.finished_at.isoformat(timespec="seconds") if step.finished_at else "",
            outcome,
        )
    console.print(table)


@runs_cli.command("cancel")
def runs_cancel(
    run_id: Annotated[int, typer.Argument(help="Run id.")],
    reason: Annotated[str, typer.Option(help="Recorded as the run's error.")] = "cancelled by CLI",
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Cancel a run: its running step is cancelled, nothing new starts, the cleanup runs."""
    app = app_from_options(database_url, schema)

    async def apply() -> Run:
        try:
            return await app.runs.cancel(run_id, reason=reason)
        finally:
            await app.close()

    console.print(f"run {run_id}: {run(apply).state}")


@runs_cli.command("retry")
def runs_retry(
    run_id: Annotated[int, typer.Argument(help="Run id.")],
    database_url: DatabaseUrl = None,
    schema: Schema = None,
) -> None:
    """Retry a failed or cancelled run from the steps that did not succeed."""
    app = app_from_options(database_url, schema)

    async def apply() -> Run:
        try:
            return await app.runs.retry(run_id)
        finally:
            await app.close()

    console.print(f"run {run_id}: {run(apply).state}")


def _preview(value: Any, limit: int) -> str:
    text = json.dumps(value, default=str, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"
