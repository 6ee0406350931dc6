"""Pipelines: named lists (or DAGs) of steps that run as one durable run.

```python
orders = app.pipeline("orders")

@orders.step(max_attempts=3)
async def validate(ctx):
    return {"total": ctx.run.input["total"]}

@orders.step()                                   # after validate
async def charge(ctx):
    return await bill(ctx.run.prev_results["validate"]["total"])

@orders.on_failure()
async def refund(ctx, failure):                 # once, if the run fails or is cancelled
    ...

run = await orders.start({"total": 42}, metadata={"triggered_by": "api"})
```

Each step is a task of its own (`orders:validate`), with its own queue,
priority, retry policy and timeout, and runs as a job: claims, leases, fencing
and rescue work exactly as for any job. A step without `depends_on` runs after
the step declared before it; `depends_on=[...]` makes a DAG (fan-out, fan-in),
`depends_on=[]` a root. A step receives `ctx.run.prev_results`: the results of
every step it depends on, directly or not.

Which step runs next is decided by the database in the transaction that
records a step's end (migration 0009), so a crash can never lose a run's
progress, and a completed step never runs again.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from conveyor import codec
from conveyor.db.control import control_channel
from conveyor.errors import InvalidArguments, InvalidJobOptions, InvalidPipeline, PayloadTooLarge
from conveyor.outcomes import Cancel
from conveyor.retry import DEFAULT_RETRY, RetryPolicy
from conveyor.run_context import RunContext
from conveyor.runs import Run
from conveyor.tasks import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_QUEUE,
    KEY_MAX_LENGTH,
    Task,
    TaskFunction,
    TaskOptions,
)

if TYPE_CHECKING:
    import psycopg

    from conveyor.app import App
    from conveyor.context import JobContext

NAME_MAX_LENGTH = 100
CLEANUP_SUFFIX = ":on_failure"
"""The cleanup task is `pipeline::on_failure`: step names cannot hold ':', so no
step's task (`pipeline:step`) can take its name."""


@dataclass(frozen=True)
class Step:
    """One step of a pipeline declared as a list: `Step(fetch, depends_on=[...])`."""

    func: TaskFunction
    _: KW_ONLY
    name: str | None = None
    """Defaults to the function's name."""
    depends_on: Sequence[str] | None = None
    """Steps that must succeed first; None = the step listed before it; [] = a root."""
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry: RetryPolicy = DEFAULT_RETRY
    timeout: timedelta | float | None = None

    @property
    def step_name(self) -> str:
        """The name the step is known by in its pipeline."""
        return self.name or self.func.__name__


@dataclass(frozen=True)
class _Declared:
    name: str
    task: Task
    depends_on: tuple[str, ...]
    ancestors: tuple[str, ...] = field(default=())


class Pipeline:
    """A named pipeline: its steps, its cleanup, and `start` to create runs."""

    def __init__(
        self,
        app: App,
        name: str,
        steps: Sequence[Step] = (),
        *,
        on_failure: TaskFunction | None = None,
    ) -> None:
        _check_name(name, "pipeline name")
        self.app = app
        self.name = name
        self._steps: dict[str, _Declared] = {}
        self._cleanup: Task | None = None
        self._steps_json: str | None = None
        if on_failure is not None:
            # Checked first, so a failed declaration registers nothing at all.
            if f"{name}:{CLEANUP_SUFFIX}" in app.tasks:
                raise InvalidPipeline(f"task {name}:{CLEANUP_SUFFIX} is already registered")
            _check_callable(on_failure, "on_failure cleanup", extra=1)
        declared = [(s, _options(s)) for s in steps]
        self._declare_all(declared)
        if on_failure is not None:
            self.on_failure()(on_failure)

    def __repr__(self) -> str:
        return f"<Pipeline {self.name} steps={list(self._steps)}>"

    @property
    def steps(self) -> list[str]:
        """Step names, in declaration order."""
        return list(self._steps)

    def depends_on(self, step: str) -> tuple[str, ...]:
        """The steps `step` waits for."""
        return self._steps[step].depends_on

    # -- declaration -------------------------------------------------------

    def step(
        self,
        *,
        name: str | None = None,
        depends_on: Sequence[str] | None = None,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout: timedelta | float | None = None,
    ) -> Callable[[TaskFunction], Task]:
        """Declare the next step (decorator). Its dependencies must be declared already."""

        def register(fn: TaskFunction) -> Task:
            spec = Step(
                func=fn,
                name=name,
                depends_on=depends_on,
                queue=queue,
                priority=priority,
                max_attempts=max_attempts,
                retry=retry,
                timeout=timeout,
            )
            self._declare_all([(spec, _options(spec))])
            return self._steps[spec.step_name].task

        return register

    def on_failure(
        self,
        *,
        queue: str = DEFAULT_QUEUE,
        priority: int = 0,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry: RetryPolicy = DEFAULT_RETRY,
        timeout: timedelta | float | None = None,
    ) -> Callable[[TaskFunction], Task]:
        """Declare the cleanup (decorator): `fn(ctx, failure: RunFailure)`, enqueued
        once when a run fails or is cancelled."""

        def register(fn: TaskFunction) -> Task:
            if self._cleanup is not None:
                raise InvalidPipeline(f"pipeline {self.name!r} already has an on_failure cleanup")
            options = _options(
                Step(
                    func=fn,
                    queue=queue,
                    priority=priority,
                    max_attempts=max_attempts,
                    retry=retry,
                    timeout=timeout,
                )
            )
            _check_callable(fn, "on_failure cleanup", extra=1)
            wrapped = _cleanup_call(fn)
            task = self._register(wrapped, f"{self.name}:{CLEANUP_SUFFIX}", options)
            self._cleanup = task
            return task

        return register

    def _declare_all(self, specs: Sequence[tuple[Step, TaskOptions]]) -> None:
        """Validate `specs` against the steps so far, then register them all, or none."""
        previous = list(self._steps)[-1] if self._steps else None
        names = list(self._steps)
        deps: dict[str, tuple[str, ...]] = {n: d.depends_on for n, d in self._steps.items()}
        for spec, _ in specs:
            step_name = spec.step_name
            _check_name(step_name, "step name")
            if step_name in deps:
                raise InvalidPipeline(f"pipeline {self.name!r}: duplicate step {step_name!r}")
            if spec.depends_on is None:
                wanted: tuple[str, ...] = () if previous is None else (previous,)
            elif isinstance(spec.depends_on, str):
                raise InvalidPipeline(
                    f"pipeline {self.name!r}: depends_on of {step_name!r} must be a list of names"
                )
            else:
                wanted = tuple(dict.fromkeys(spec.depends_on))
            deps[step_name] = wanted
            names.append(step_name)
            previous = step_name
        for step_name in names:
            unknown = [d for d in deps[step_name] if d not in deps]
            if unknown:
                raise InvalidPipeline(
                    f"pipeline {self.name!r}: step {step_name!r} depends on unknown "
                    f"step(s) {unknown}"
                )
        ancestors = _ancestors(self.name, deps)
        for spec, _ in specs:
            if f"{self.name}:{spec.step_name}" in self.app.tasks:
                raise InvalidPipeline(f"task {self.name}:{spec.step_name} is already registered")
            _check_callable(spec.func, f"step {spec.step_name!r}", extra=0)
        for spec, options in specs:
            step_name = spec.step_name
            task = self._register(spec.func, f"{self.name}:{step_name}", options)
            self._steps[step_name] = _Declared(
                step_name, task, deps[step_name], ancestors[step_name]
            )
        self._steps_json = None

    def _register(self, fn: TaskFunction, task_name: str, options: TaskOptions) -> Task:
        if task_name in self.app.tasks:
            raise InvalidPipeline(f"task {task_name} is already registered")
        task = Task(
            self.app, fn, task_name, options, prepare=_attach_run, encode_result=codec.dumps
        )
        self.app.tasks[task_name] = task
        return task

    # -- runs --------------------------------------------------------------

    async def start(
        self,
        input: Any = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
        connection: psycopg.AsyncConnection[Any] | None = None,
    ) -> Run:
        """Create a run. It starts at once, unless `key` is given and another run
        of this pipeline with that key has not ended: then it waits its turn (FIFO).

        With `connection`, the run is created in the caller's transaction and
        exists (and starts) only if it commits.
        """
        params = self._start_params(input, metadata, key)
        rows = await self.app.db.fetch(
            "start run", "run_start", params, conn=connection, idempotent=False
        )
        return Run.from_row(rows[0])

    def start_sync(
        self,
        input: Any = None,
        *,
        metadata: Mapping[str, Any] | None = None,
        key: str | None = None,
        connection: psycopg.Connection[Any] | None = None,
    ) -> Run:
        """Sync twin of `start`, for code without an event loop."""
        params = self._start_params(input, metadata, key)
        rows = self.app.db.fetch_sync(
            "start run", "run_start", params, conn=connection, idempotent=False
        )
        return Run.from_row(rows[0])

    def _start_params(
        self, run_input: Any, metadata: Mapping[str, Any] | None, key: str | None
    ) -> dict[str, Any]:
        if not self._steps:
            raise InvalidPipeline(f"pipeline {self.name!r} has no steps")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidArguments(f"metadata must be a mapping, got {type(metadata).__name__}")
        if key is not None and (
            not isinstance(key, str) or not key or "\x00" in key or len(key) > KEY_MAX_LENGTH
        ):
            raise InvalidJobOptions(
                f"key must be a non-empty string of at most {KEY_MAX_LENGTH} characters, "
                f"got {key!r}"
            )
        encoded_input = codec.dumps(run_input)
        encoded_metadata = codec.dumps(dict(metadata or {}))
        size = len(encoded_input) + len(encoded_metadata)
        if size > self.app.config.max_payload_bytes:
            raise PayloadTooLarge(size, self.app.config.max_payload_bytes)
        return {
            "pipeline": self.name,
            "key": key,
            "input": encoded_input,
            "metadata": encoded_metadata,
            "steps": self._steps_document(),
            "cleanup": None if self._cleanup is None else json.dumps(_job_fields(self._cleanup)),
            "channel": control_channel(self.app.config.schema),
        }

    def _steps_document(self) -> str:
        if self._steps_json is None:
            self._steps_json = json.dumps(
                [
                    {
                        "name": declared.name,
                        "position": position,
                        "depends_on": list(declared.depends_on),
                        "ancestors": list(declared.ancestors),
                        **_job_fields(declared.task),
                    }
                    for position, declared in enumerate(self._steps.values())
                ]
            )
        return self._steps_json


def _options(spec: Step) -> TaskOptions:
    timeout = spec.timeout
    if isinstance(timeout, bool):
        raise InvalidPipeline(f"step timeout must be a duration, got {timeout!r}")
    if isinstance(timeout, int | float):
        timeout = timedelta(seconds=timeout)
    return TaskOptions(
        queue=spec.queue,
        priority=spec.priority,
        max_attempts=spec.max_attempts,
        retry=spec.retry,
        timeout=timeout,
    )


def _check_callable(fn: object, what: str, *, extra: int) -> None:
    """Raise `InvalidPipeline` unless `fn` can be called with the context and `extra`
    more positional arguments (a step: `fn(ctx)`; the cleanup: `fn(ctx, failure)`)."""
    if not callable(fn):
        raise InvalidPipeline(f"{what} must be a function, got {fn!r}")
    try:
        inspect.signature(fn).bind(*([None] * (1 + extra)))
    except TypeError as exc:
        shape = "fn(ctx)" if extra == 0 else "fn(ctx, failure)"
        raise InvalidPipeline(f"{what} must be callable as {shape}: {exc}") from exc
    except ValueError:
        return  # no signature to inspect (some builtins): let the call decide


def _job_fields(task: Task) -> dict[str, Any]:
    options = task.options
    timeout_ms = None
    if options.timeout is not None:
        timeout_ms = max(1, round(options.timeout / timedelta(milliseconds=1)))
    return {
        "task": task.name,
        "queue": options.queue,
        "priority": options.priority,
        "max_attempts": options.max_attempts,
        "timeout_ms": timeout_ms,
    }


def _check_name(name: object, what: str) -> None:
    if (
        not isinstance(name, str)
        or not name
        or ":" in name
        or "\x00" in name
        or len(name) > NAME_MAX_LENGTH
    ):
        raise InvalidPipeline(
            f"{what} must be a non-empty string of at most {NAME_MAX_LENGTH} characters "
            f"without ':', got {name!r}"
        )


def _ancestors(pipeline: str, deps: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Every step's transitive dependencies; raises `InvalidPipeline` on a cycle."""
    done: dict[str, tuple[str, ...]] = {}
    visiting: list[str] = []

    def visit(name: str) -> tuple[str, ...]:
        if name in done:
            return done[name]
        if name in visiting:
            cycle = [*visiting[visiting.index(name) :], name]
            raise InvalidPipeline(f"pipeline {pipeline!r} has a cycle: {' -> '.join(cycle)}")
        visiting.append(name)
        found: dict[str, None] = {}
        for dep in deps[name]:
            found.update(dict.fromkeys(visit(dep)))
            found[dep] = None
        visiting.pop()
        done[name] = tuple(found)
        return done[name]

    for name in deps:
        visit(name)
    return done


async def _attach_run(ctx: JobContext) -> None:
    """Load the step's run before the attempt; a run that halted starts nothing new."""
    row = ctx.job.run_context
    if row is None:
        rows = await ctx.app.db.fetch("load run", "run_job_context", {"job_id": ctx.job.id})
        row = rows[0]["context"] if rows else None
    if row is None:
        raise Cancel(f"job {ctx.job.id} belongs to no run")
    is_cleanup = row["cleanup_job_id"] == ctx.job.id
    if not is_cleanup and (row["step"] is None or row["run_state"] != "running"):
        raise Cancel(f"run {row['run_id']} is {row['run_state']}: this step no longer runs")
    ctx.attach_run(RunContext.from_row(ctx, row))


def _cleanup_call(fn: TaskFunction) -> TaskFunction:
    """`fn(ctx, failure)` as a task function of `ctx` alone, keeping it sync or async."""
    if inspect.iscoroutinefunction(fn):

        async def call_async(ctx: JobContext) -> Any:
            return await fn(ctx, ctx.run.failure)

        return call_async

    def call(ctx: JobContext) -> Any:
        return fn(ctx, ctx.run.failure)

    return call
