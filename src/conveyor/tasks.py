"""Tasks: registered functions, their options, and what an enqueue asks for.

```python
@app.task(queue="emails", max_attempts=5, timeout=timedelta(seconds=30))
async def send(ctx, to: str) -> None: ...

await send.enqueue(to="a@example.com")
await send.configure(delay=timedelta(minutes=5), priority=10).enqueue(to="b@example.com")
send.enqueue_sync(to="c@example.com")            # from sync code
```
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, time, timedelta
from typing import TYPE_CHECKING, Any, Literal

from conveyor.codec import compact_json
from conveyor.errors import ConfigError, InvalidArguments, InvalidJobOptions, PayloadTooLarge
from conveyor.retry import DEFAULT_RETRY, RetryPolicy
from conveyor.windows import ExecutionWindow, as_window

if TYPE_CHECKING:
    import psycopg

    from conveyor.app import App
    from conveyor.context import JobContext
    from conveyor.jobs import Job

PRIORITY_MIN = -100
PRIORITY_MAX = 100
DEFAULT_MAX_ATTEMPTS = 5
"""Five attempts ride out a minute-long outage with the default backoff."""
DEFAULT_QUEUE = "default"
CONCURRENCY_LIMIT_MAX = 100_000
QUEUE_LENGTH_MAX = 2**31 - 1
KEY_MAX_LENGTH = 200
KeySource = str | Callable[[Mapping[str, Any]], str]
OnConflict = Literal["ignore", "supersede"]
MAX_ATTEMPTS_LIMIT = 1_000_000
TIMEOUT_MIN = timedelta(milliseconds=1)
TIMEOUT_MAX = timedelta(milliseconds=2**31 - 1)
"""The jobs.timeout_ms column is a 32-bit integer of milliseconds (about 24.8 days)."""


@dataclass(frozen=True, kw_only=True)
class TaskOptions:
    """Defaults a task gives each of its jobs; most can be overridden per enqueue."""

    queue: str = DEFAULT_QUEUE
    """Queue its jobs go to."""
    priority: int = 0
    """Higher runs first, within [-100, 100]."""
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    """Attempts before the job ends `failed` (1 = never retried)."""
    retry: RetryPolicy = DEFAULT_RETRY
    """Delay before the next attempt after a failure."""
    timeout: timedelta | None = None
    """Longest one attempt may run; None = no limit."""
    concurrency_limit: int | None = None
    """Most jobs of one concurrency key running at once, across all workers."""
    concurrency_key: KeySource | None = None
    """The key: a template formatted with the job's arguments (`"account:{account_id}"`)
    or a function of them; None with a limit means the task name (one key per task)."""
    max_queue_length: int | None = None
    """Most jobs of one key waiting at once; an enqueue past it raises `QueueFull`."""
    window: ExecutionWindow | None = None
    """Daily span of local time in which its jobs may start (see `conveyor.windows`)."""
    rate_limit: RateLimit | None = None
    """Most starts per period per key, across all workers:
    `RateLimit(10, timedelta(seconds=1))`."""
    partition: bool = False
    """Keep its jobs in a partition of the jobs table of their own (hot-task
    isolation, see `conveyor.partitions`); a starting worker creates it."""

    def __post_init__(self) -> None:
        if self.rate_limit is not None and self.concurrency_limit is None:
            # A rate applies per key; without a limit of its own the key is unbounded.
            object.__setattr__(self, "concurrency_limit", CONCURRENCY_LIMIT_MAX)
        try:
            _check_options(self.queue, self.priority, self.max_attempts, self.timeout)
            check_concurrency_limit(self.concurrency_limit)
        except InvalidJobOptions as exc:
            raise ConfigError(f"task option: {exc}") from exc
        if self.concurrency_key is not None and self.concurrency_limit is None:
            raise ConfigError("task option: concurrency_key needs a concurrency_limit")
        _check_cap_options(self.max_queue_length, self.concurrency_limit, ConfigError)
        if not isinstance(self.partition, bool):
            raise ConfigError(
                f"task option: partition must be True or False, got {self.partition!r}"
            )


def _check_options(queue: str, priority: int, max_attempts: int, timeout: timedelta | None) -> None:
    if not isinstance(queue, str) or not queue or "\x00" in queue:
        raise InvalidJobOptions("queue must be a non-empty string")
    if not _is_int(priority) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidJobOptions(
            f"priority must be an integer within [{PRIORITY_MIN}, {PRIORITY_MAX}], got {priority!r}"
        )
    if not _is_int(max_attempts) or not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise InvalidJobOptions(
            f"max_attempts must be an integer within [1, {MAX_ATTEMPTS_LIMIT}], "
            f"got {max_attempts!r}"
        )
    if timeout is not None and not isinstance(timeout, timedelta):
        raise InvalidJobOptions(f"timeout must be a timedelta, got {timeout!r}")
    if timeout is not None and not TIMEOUT_MIN <= timeout <= TIMEOUT_MAX:
        raise InvalidJobOptions(
            f"timeout must be within [{TIMEOUT_MIN}, {TIMEOUT_MAX}], got {timeout}"
        )


def check_concurrency_limit(limit: int | None) -> None:
    """Raise `InvalidJobOptions` unless `limit` is None or within [1, CONCURRENCY_LIMIT_MAX]."""
    if limit is not None and (not _is_int(limit) or not 1 <= limit <= CONCURRENCY_LIMIT_MAX):
        raise InvalidJobOptions(
            f"concurrency_limit must be an integer within [1, {CONCURRENCY_LIMIT_MAX}], "
            f"got {limit!r}"
        )


def _check_cap_options(
    cap: int | None, limit: int | None, error: type[ConfigError | InvalidJobOptions]
) -> None:
    if cap is None:
        return
    if not _is_int(cap) or not 1 <= cap <= QUEUE_LENGTH_MAX:
        raise error(
            f"max_queue_length must be an integer within [1, {QUEUE_LENGTH_MAX}], got {cap!r}"
        )
    if limit is None:
        raise error("max_queue_length applies per concurrency key: it needs a concurrency_limit")


@dataclass(frozen=True)
class RateLimit:
    """At most `count` starts per `per`, per concurrency key, across all workers.

    Counted in fixed windows: the first start after a window ran out opens the
    next one, so at most `count` jobs of a key start within any one window.
    """

    count: int
    per: timedelta

    def __post_init__(self) -> None:
        if not _is_int(self.count) or self.count < 1:
            raise ConfigError(f"RateLimit.count must be an integer >= 1, got {self.count!r}")
        if not isinstance(self.per, timedelta) or self.per <= timedelta(0):
            raise ConfigError(f"RateLimit.per must be a positive duration, got {self.per!r}")


def _check_types(delay: object, run_at: object, rate_limit: object) -> None:
    if delay is not None and not isinstance(delay, timedelta):
        raise InvalidJobOptions(f"delay must be a timedelta, got {delay!r}")
    if run_at is not None and not isinstance(run_at, datetime):
        raise InvalidJobOptions(f"run_at must be a timezone-aware datetime, got {run_at!r}")
    if rate_limit is not None and not isinstance(rate_limit, RateLimit):
        raise InvalidJobOptions(f"rate_limit must be a RateLimit, got {rate_limit!r}")


def _check_dedup(dedup_key: object, on_conflict: object, supersede_running: object) -> None:
    if dedup_key is not None and (
        not isinstance(dedup_key, str)
        or not dedup_key
        or "\x00" in dedup_key
        or len(dedup_key) > KEY_MAX_LENGTH
    ):
        raise InvalidJobOptions(
            f"dedup_key must be a non-empty string of at most {KEY_MAX_LENGTH} characters, "
            f"got {dedup_key!r}"
        )
    if on_conflict not in ("ignore", "supersede"):
        raise InvalidJobOptions(f"on_conflict must be 'ignore' or 'supersede', got {on_conflict!r}")
    if not isinstance(supersede_running, bool):
        raise InvalidJobOptions("supersede_running must be a bool")
    if supersede_running and on_conflict != "supersede":
        raise InvalidJobOptions("supersede_running needs on_conflict='supersede'")
    if on_conflict == "supersede" and dedup_key is None:
        raise InvalidJobOptions("on_conflict='supersede' needs a dedup_key")


def resolve_key(source: KeySource, args: Mapping[str, Any], task: str) -> str:
    """The concurrency key for one job; raises `InvalidArguments` when it cannot be built."""
    try:
        key = source(args) if callable(source) else source.format(**args)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise InvalidArguments(f"task {task!r}: cannot build concurrency key: {exc!r}") from exc
    check_key(key, task)
    return key


def check_key(key: object, task: str = "") -> None:
    """Raise `InvalidArguments` unless `key` is a usable concurrency key (stored verbatim)."""
    if not isinstance(key, str) or not key or "\x00" in key or len(key) > KEY_MAX_LENGTH:
        where = f"task {task!r}: " if task else ""
        raise InvalidArguments(
            f"{where}concurrency key must be a non-empty string of at most "
            f"{KEY_MAX_LENGTH} characters without NUL, got {key!r}"
        )


def _is_int(value: object) -> bool:
    # bool is an int subclass; priority=True is a bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One job to enqueue: a task name, its arguments and per-job options."""

    task: str
    args: Mapping[str, Any] = field(default_factory=dict)
    queue: str = DEFAULT_QUEUE
    priority: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    delay: timedelta | None = None
    run_at: datetime | None = None
    timeout: timedelta | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    concurrency_key: str | None = None
    """Jobs sharing it start in enqueue order, at most `concurrency_limit` at once."""
    concurrency_limit: int | None = None
    """The key's limit if this enqueue creates the key (see `App.set_limit`)."""
    max_queue_length: int | None = None
    """The key's cap if this enqueue creates the key."""
    window: ExecutionWindow | str | None = None
    """Only start this job inside the window (`"09:00-17:00 Europe/Oslo"`)."""
    rate_limit: RateLimit | None = None
    """The key's rate if this enqueue creates the key."""
    dedup_key: str | None = None
    """While a job of this task with this key is waiting or running, enqueue returns
    it instead of creating another."""
    on_conflict: OnConflict = "ignore"
    """With a dedup key: "ignore" keeps the existing job; "supersede" gives a waiting
    one this enqueue's arguments and options."""
    supersede_running: bool = False
    """With "supersede": a running job with the key is cancelled and a new one enqueued."""

    def encode(self, max_payload_bytes: int) -> EncodedJob:
        """Validate and JSON-encode; raises a typed error for any bad value."""
        _check_options(self.queue, self.priority, self.max_attempts, self.timeout)
        check_concurrency_limit(self.concurrency_limit)
        _check_cap_options(self.max_queue_length, self.concurrency_limit, InvalidJobOptions)
        if self.concurrency_key is not None:
            if self.concurrency_limit is None:
                raise InvalidJobOptions("concurrency_key needs a concurrency_limit")
            check_key(self.concurrency_key, self.task)
        _check_types(self.delay, self.run_at, self.rate_limit)
        if self.delay is not None and self.run_at is not None:
            raise InvalidJobOptions("give delay or run_at, not both")
        if self.delay is not None and self.delay < timedelta(0):
            raise InvalidJobOptions(f"delay must not be negative, got {self.delay}")
        if self.run_at is not None and self.run_at.tzinfo is None:
            raise InvalidJobOptions("run_at must be timezone-aware")
        try:
            window = as_window(self.window)
        except ConfigError as exc:
            raise InvalidJobOptions(str(exc)) from exc
        _check_dedup(self.dedup_key, self.on_conflict, self.supersede_running)
        args = _to_json(self.args, self.task)
        meta = _to_json(self.meta, None)
        size = len(args.encode())
        if size > max_payload_bytes:
            raise PayloadTooLarge(size, max_payload_bytes)
        return EncodedJob(
            queue=self.queue,
            task=self.task,
            args=args,
            priority=self.priority,
            max_attempts=self.max_attempts,
            run_at=self.run_at,
            delay_s=(self.delay or timedelta(0)).total_seconds(),
            timeout_ms=None if self.timeout is None else _milliseconds(self.timeout),
            meta=meta,
            concurrency_key=self.concurrency_key,
            concurrency_limit=self.concurrency_limit if self.concurrency_key else None,
            max_queue_length=self.max_queue_length if self.concurrency_key else None,
            window_start=window.start if window else None,
            window_end=window.end if window else None,
            window_tz=window.tz if window else None,
            rate_limit=self.rate_limit.count if self.rate_limit and self.concurrency_key else None,
            rate_period_s=(
                self.rate_limit.per.total_seconds()
                if self.rate_limit and self.concurrency_key
                else None
            ),
            dedup_key=self.dedup_key,
            on_conflict=self.on_conflict,
            supersede_running=self.supersede_running,
        )


def _milliseconds(duration: timedelta) -> int:
    # Round up: a 0.4 ms timeout must not become "no time at all".
    return math.ceil(duration / timedelta(milliseconds=1))


@dataclass(kw_only=True, slots=True)
class EncodedJob:
    """A validated JobSpec, as the insert statement takes it."""

    queue: str
    task: str
    args: str
    priority: int
    max_attempts: int
    run_at: datetime | None
    delay_s: float
    timeout_ms: int | None
    meta: str
    concurrency_key: str | None
    concurrency_limit: int | None
    max_queue_length: int | None
    window_start: time | None
    window_end: time | None
    window_tz: str | None
    rate_limit: int | None = None
    rate_period_s: float | None = None
    dedup_key: str | None = None
    on_conflict: OnConflict = "ignore"
    supersede_running: bool = False


def _to_json(value: Mapping[str, Any], task: str | None) -> str:
    """`value` as JSON text; `task` names whose arguments these are (None: meta)."""
    if not isinstance(value, Mapping):
        raise InvalidArguments(f"{_what(task)} must be a mapping, got {type(value).__name__}")
    try:
        encoded = compact_json(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArguments(f"{_what(task)} are not JSON-serialisable: {exc}") from exc
    if "\\u0000" in encoded and _has_nul(value):
        raise InvalidArguments(
            f"{_what(task)} contain a NUL character, which PostgreSQL cannot store"
        )
    return encoded


def _what(task: str | None) -> str:
    return "meta" if task is None else f"arguments of task {task!r}"


def _has_nul(value: object) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


TaskFunction = Callable[..., Any]

Prepare = Callable[["JobContext"], Awaitable[None]]
ResultEncoder = Callable[[Any], str]


_BINDABLE_CACHE_SIZE = 64
"""Argument-name sets remembered per task as known to bind (a task taking
`**kwargs` could otherwise grow the set without bound)."""


class Task:
    """A registered task function. Call `enqueue` to run it in a worker.

    `prepare` runs on the worker's loop before each attempt (pipeline steps load
    their run there); `encode_result` turns the return value into stored JSON.
    """

    def __init__(
        self,
        app: App,
        func: TaskFunction,
        name: str,
        options: TaskOptions,
        *,
        prepare: Prepare | None = None,
        encode_result: ResultEncoder | None = None,
    ) -> None:
        self.app = app
        self.func = func
        self.name = name
        self.options = options
        self.prepare = prepare
        self.encode_result = encode_result
        self.is_async = inspect.iscoroutinefunction(func)
        self._signature = _signature_without_context(func, name)
        self._bindable: set[tuple[str, ...]] = set()

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.options.queue}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function directly, in this process (handy in unit tests)."""
        return self.func(*args, **kwargs)

    def check_arguments(self, args: Mapping[str, Any]) -> None:
        """Raise `InvalidArguments` unless `args` bind to the function's parameters."""
        # Whether keyword arguments bind depends only on their names, and a bulk
        # enqueue checks the same few name sets again and again.
        names = tuple(args) if isinstance(args, dict) else None
        if names in self._bindable:
            return
        try:
            self._signature.bind(**args)
        except TypeError as exc:
            raise InvalidArguments(f"task {self.name!r}: {exc}") from exc
        if names is not None and len(self._bindable) < _BINDABLE_CACHE_SIZE:
            self._bindable.add(names)

    def job(self, **args: Any) -> JobSpec:
        """A `JobSpec` with this task's defaults, for `App.enqueue_many`."""
        return self.configure().job(**args)

    def configure(self, **options: Any) -> TaskCall:
        """Per-enqueue options: queue, priority, max_attempts, delay, run_at, timeout,
        meta, and `connection` to enqueue inside the caller's transaction."""
        return TaskCall(self, **options)

    async def enqueue(self, **args: Any) -> Job:
        """Enqueue one job with these keyword arguments; returns the stored job."""
        return await self.configure().enqueue(**args)

    def enqueue_sync(self, **args: Any) -> Job:
        """Sync twin of `enqueue`, for code without an event loop."""
        return self.configure().enqueue_sync(**args)


class TaskCall:
    """A task with per-enqueue options, as returned by `Task.configure`."""

    def __init__(
        self,
        task: Task,
        *,
        connection: psycopg.AsyncConnection[Any] | psycopg.Connection[Any] | None = None,
        **options: Any,
    ) -> None:
        self.task = task
        self.connection = connection
        base = JobSpec(
            task=task.name,
            queue=task.options.queue,
            priority=task.options.priority,
            max_attempts=task.options.max_attempts,
            timeout=task.options.timeout,
            concurrency_limit=task.options.concurrency_limit,
            max_queue_length=task.options.max_queue_length,
            window=task.options.window,
            rate_limit=task.options.rate_limit,
        )
        if "task" in options or "args" in options:
            raise InvalidJobOptions("configure() takes job options; pass arguments to enqueue()")
        try:
            self._template = replace(base, **options)
        except TypeError as exc:
            raise InvalidJobOptions(f"unknown enqueue option: {exc}") from exc

    def job(self, **args: Any) -> JobSpec:
        """A `JobSpec` with these options and arguments (arguments are checked)."""
        self.task.check_arguments(args)
        spec = replace(self._template, args=args)
        if spec.rate_limit is not None and spec.concurrency_limit is None:
            spec = replace(spec, concurrency_limit=CONCURRENCY_LIMIT_MAX)
        if spec.concurrency_key is None and spec.concurrency_limit is not None:
            # Per-task or per-enqueue limits without an explicit key: the task's key
            # template, else one key for the whole task.
            source = self.task.options.concurrency_key or self.task.name
            spec = replace(spec, concurrency_key=resolve_key(source, args, self.task.name))
        return spec

    async def enqueue(self, **args: Any) -> Job:
        """Enqueue one job; inside `connection`'s transaction when one was given."""
        import psycopg

        conn = self.connection
        if conn is not None and not isinstance(conn, psycopg.AsyncConnection):
            raise InvalidJobOptions("enqueue() needs an async connection; use enqueue_sync()")
        (job,) = await self.task.app.enqueue_many([self.job(**args)], connection=conn)
        return job

    def enqueue_sync(self, **args: Any) -> Job:
        """Sync twin of `enqueue`."""
        import psycopg

        conn = self.connection
        if conn is not None and not isinstance(conn, psycopg.Connection):
            raise InvalidJobOptions("enqueue_sync() needs a sync connection; use enqueue()")
        (job,) = self.task.app.enqueue_many_sync([self.job(**args)], connection=conn)
        return job


def _signature_without_context(func: TaskFunction, name: str) -> inspect.Signature:
    signature = inspect.signature(func)
    params = list(signature.parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise ConfigError(f"task {name!r} must take the job context as its first parameter")
    return signature.replace(parameters=params[1:])
