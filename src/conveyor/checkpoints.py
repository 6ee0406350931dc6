"""`ctx.step(name, fn)`: sub-steps of a task whose results survive retries.

The first attempt to reach a sub-step runs `fn` and records its result for the
job; a later attempt of the same job (after a failure or a crash) gets the
recorded result back without running `fn` again. The record is fenced by the
attempt's lease token, so a stale attempt cannot record anything.

With `atomic=True`, `fn` receives a connection in an open transaction, and its
writes commit together with the record, or not at all: exactly-once database
effects, whatever crashes in between. Without it, `fn` may run again if the
attempt dies after `fn` finished and before its result was recorded (the
at-least-once window of any job), but never once it was recorded.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import TYPE_CHECKING, Any

from conveyor import codec
from conveyor.errors import InvalidArguments, LeaseLost

if TYPE_CHECKING:
    from collections.abc import Callable

    from conveyor.context import JobContext


async def load(ctx: JobContext) -> dict[str, Any]:
    """The job's recorded sub-step results, by name."""
    rows = await ctx.app.db.fetch("read checkpoints", "checkpoint_list", {"job_id": ctx.job.id})
    return {row["name"]: codec.decode(row["value"]) for row in rows}


async def run_step(
    ctx: JobContext,
    memo: dict[str, Any],
    locks: dict[str, asyncio.Lock],
    name: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    atomic: bool,
) -> Any:
    """Return `name`'s recorded result, or run `fn` and record it (see the module doc)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InvalidArguments(f"step names are non-empty strings, got {name!r}")
    if name in memo:
        return memo[name]
    # Two concurrent calls with one name (asyncio.gather) run fn once: the second
    # waits for the first and then finds its result recorded.
    async with locks.setdefault(name, asyncio.Lock()):
        if name in memo:
            return memo[name]
        if atomic:
            value = await _run_atomic(ctx, name, fn, args, kwargs)
        else:
            value = await _maybe_await(fn(*args, **kwargs))
            await _record(ctx, name, value, conn=None)
        memo[name] = value
        return value


async def _run_atomic(
    ctx: JobContext,
    name: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    async with ctx.app.db.connection() as conn, conn.transaction():
        value = await _maybe_await(fn(conn, *args, **kwargs))
        await _record(ctx, name, value, conn=conn)
    return value


async def _record(ctx: JobContext, name: str, value: Any, *, conn: Any) -> None:
    params = {
        "job_id": ctx.job.id,
        "token": ctx.job.lease_token,
        "name": name,
        "value": codec.dumps(value),
    }
    rows = await ctx.app.db.fetch("record checkpoint", "checkpoint_insert", params, conn=conn)
    if not rows:
        # Raised inside the atomic transaction, this also rolls back fn's writes.
        raise LeaseLost(f"job {ctx.job.id} no longer holds its lease: step {name!r} not recorded")


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
