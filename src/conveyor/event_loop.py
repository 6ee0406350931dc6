"""The event loop conveyor's own entry points run on: uvloop where it is installed.

`conveyor worker`, the other commands, `conveyor demo` and `conveyor bench`
start their event loop here: uvloop when it is installed (`pip install
'conveyor[uvloop]'`; not on Windows), else, or with
`CONVEYOR_EVENT_LOOP=asyncio`, the standard loop. A worker spends much of its
Python time in the event loop (a task per job, callbacks, socket readiness),
and uvloop does that work in C:
measured on 2 cores, 10-15% more jobs/s for no-op jobs at concurrency 10 and
50, and 20% for one busy concurrency key (`docs/performance.md`).

An application that runs workers inside its own event loop chooses that loop
itself (`uvloop.run(main())`, or `asyncio.run`): conveyor works on both.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

from conveyor.errors import ConfigError

T = TypeVar("T")

ENV_EVENT_LOOP: Final = "CONVEYOR_EVENT_LOOP"
"""Environment variable choosing the loop: `auto` (default), `uvloop` or `asyncio`."""

CHOICES: Final = ("auto", "uvloop", "asyncio")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(choice: str | None = None) -> LoopFactory | None:
    """The factory of the loop to run, None for the standard one.

    `choice` (else `CONVEYOR_EVENT_LOOP`, else `auto`): `auto` takes uvloop if
    it can be imported; `uvloop` requires it (ConfigError if missing);
    `asyncio` is the standard loop.
    """
    wanted = (choice or os.environ.get(ENV_EVENT_LOOP) or "auto").strip().lower()
    if wanted not in CHOICES:
        raise ConfigError(
            f"the event loop (--loop or {ENV_EVENT_LOOP}) must be one of "
            f"{', '.join(CHOICES)}, got {wanted!r}"
        )
    if wanted == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if wanted == "uvloop":
            raise ConfigError(
                "uvloop was asked for but is not installed: pip install 'conveyor[uvloop]'"
            ) from None
        return None
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], *, loop: str | None = None) -> T:
    """Run `main` to completion in a new event loop of `loop`'s kind (see `loop_factory`)."""
    try:
        factory = loop_factory(loop)
    except ConfigError:
        main.close()  # never started: no "coroutine was never awaited" warning
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def loop_name() -> str:
    """`uvloop` or `asyncio`: the loop the caller runs on, or outside any loop the
    one `run` would start (for reports)."""
    try:
        module = type(asyncio.get_running_loop()).__module__
    except RuntimeError:
        return "asyncio" if loop_factory() is None else "uvloop"
    return "uvloop" if module.startswith("uvloop") else "asyncio"
