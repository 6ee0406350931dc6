"""`conveyor partitions`: list, create and remove per-task partitions of the jobs table."""

from __future__ import annotations

from datetime import UTC
from typing import Annotated

import typer
from rich.table import Table

from conveyor.cli.common import DatabaseUrl, Schema, console, run_on_app

partitions_cli = typer.Typer(
    help="Per-task partitions of the jobs table (hot-task isolation): list, create, remove."
)

Task = Annotated[str, typer.Argument(help="The task's name, as registered.")]


@partitions_cli.callback(invoke_without_command=True)
def partitions_list(
    ctx: typer.Context, database_url: DatabaseUrl = None, schema: Schema = None
) -> None:
    """List the tasks that have a partition of their own: its table, rows (PostgreSQL's
    estimate), size on disk and creation time."""
    if ctx.invoked_subcommand is not None:
        return
    found = run_on_app(database_url, schema, lambda app: app.partitions.all())
    table = Table(title="conveyor partitions")
    table.add_column("task", overflow="fold")
    table.add_column("table", overflow="fold")
    for column in ("rows~", "size", "created (UTC)"):
        table.add_column(column, no_wrap=True)
    for p in found:
        table.add_row(
            p.task,
            p.table_name,
            str(p.estimated_rows),
            f"{p.size_bytes / 1_048_576:.1f} MiB",
            f"{p.created_at.astimezone(UTC):%Y-%m-%d %H:%M}",
        )
    if not found:
        table.add_row("(none: every task's jobs are in the default partition)", "", "", "", "")
    console.print(table)


@partitions_cli.command("create")
def partitions_create(task: Task, database_url: DatabaseUrl = None, schema: Schema = None) -> None:
    """Give a task its own partition, moving its existing jobs into it."""
    table_name = run_on_app(database_url, schema, lambda app: app.partitions.create(task))
    console.print(f"{task}: partition {table_name}")


@partitions_cli.command("remove")
def partitions_remove(task: Task, database_url: DatabaseUrl = None, schema: Schema = None) -> None:
    """Move a task's jobs back to the default partition and drop its own."""
    removed = run_on_app(database_url, schema, lambda app: app.partitions.remove(task))
    console.print(f"{task}: " + ("partition removed" if removed else "had no partition"))
