"""Options and helpers shared by the `conveyor` commands."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from conveyor.app import App
from conveyor.config import Config
from conveyor.errors import ConveyorError
from conveyor.event_loop import run as run_loop

console = Console()
err_console = Console(stderr=True)
T = TypeVar("T")

DatabaseUrl = Annotated[
    str | None,
    typer.Option("--database-url", envvar="CONVEYOR_DATABASE_URL", help="PostgreSQL URL."),
]
Schema = Annotated[
    str | None, typer.Option("--schema", envvar="CONVEYOR_SCHEMA", help="Schema name.")
]


def fail(exc: Exception) -> typer.Exit:
    """Print `exc` as an error and return the exit to raise (code 2)."""
    err_console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(code=2)


def run(factory: Callable[[], Coroutine[Any, Any, T]], *, loop: str | None = None) -> T:
    """Run a coroutine on conveyor's event loop (`conveyor.event_loop`, uvloop where
    installed, or `loop`); a ConveyorError becomes a clean error exit."""
    try:
        return run_loop(factory(), loop=loop)
    except ConveyorError as exc:
        raise fail(exc) from None


def app_from_options(database_url: str | None, schema: str | None) -> App:
    """An App with no tasks, for commands that only read or operate on the database."""
    try:
        return App(config=Config.from_env(database_url=database_url, schema=schema))
    except ConveyorError as exc:
        raise fail(exc) from None


def run_on_app(
    database_url: str | None,
    schema: str | None,
    action: Callable[[App], Coroutine[Any, Any, T]],
) -> T:
    """Run `action` on a task-less App for these options, closing it afterwards."""
    app = app_from_options(database_url, schema)

    async def act() -> T:
        try:
            return await action(app)
        finally:
            await app.close()

    return run(act)
