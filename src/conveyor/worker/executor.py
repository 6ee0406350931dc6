"""Run one claimed job and turn whatever happens into an `Outcome`.

The executor never writes to the database; the completer does. Sync task
functions run in the worker's thread pool so they cannot block the loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import timedelta
from typing import Any

from conveyor.context import JobContext
from conveyor.errors import TaskNotFound
from conveyor.jobs import Job
from conveyor.outcomes import Cancel, Retry, Snooze
from conveyor.retry import DEFAULT_RETRY, RetryPolicy
from conveyor.tasks import Task
from conveyor.worker.outcome import Outcome, error_record

log = logging.getLogger("conveyor.worker")


class AttemptTimeout(TimeoutError):
    """The attempt ran past its task's timeout."""


class ShutdownReturn(Exception):
    """The worker stopped before the attempt finished; the job goes back, attempt refunded."""


async def execute(
    job: Job,
    task: Task | None,
    ctx: JobContext,
    threads: Executor,
) -> Outcome:
    """Run `job` and return its outcome; never raises except on programming errors."""
    assert job.lease_token is not None
    token = job.lease_token
    if task is None:
        return _failure(job, token, TaskNotFound(job.task), DEFAULT_RETRY)
    try:
        value = await _call(task, job, ctx, threads)
        return Outcome.succeeded(job.id, token, _encode_result(value))
    except asyncio.CancelledError as cancelled:
        if ctx.stop_reason is None:
            # Raised by the task's own code, not by the worker: a failure like any other.
            return _failure(job, token, cancelled, task.options.retry)
        # The worker is shutting down past its grace: give the job back, attempt refunded.
        return Outcome.retry(job.id, token, timedelta(0), None, refund=True)
    except Exception as exc:
        return _outcome_of(exc, job, token, task.options.retry)


def _outcome_of(exc: Exception, job: Job, token: int, policy: RetryPolicy) -> Outcome:
    """The outcome of an attempt that raised `exc`: an outcome signal or a failure."""
    if isinstance(exc, Snooze):
        return Outcome.retry(job.id, token, exc.delay, None, refund=True)
    if isinstance(exc, Cancel):
        error = error_record(exc, job.attempt, with_traceback=False)
        return Outcome(job.id, token, "cancelled", error=error)
    if isinstance(exc, Retry):
        return _failure(job, token, exc, policy, delay=exc.delay)
    return _failure(job, token, exc, policy)


async def _call(task: Task, job: Job, ctx: JobContext, threads: Executor) -> Any:
    timeout = None if job.timeout_ms is None else job.timeout_ms / 1000
    if task.is_async:
        call = task.func(ctx, **job.args)
    else:
        loop = asyncio.get_running_loop()
        bound: Callable[[], Any] = functools.partial(task.func, ctx, **job.args)
        call = loop.run_in_executor(threads, bound)
    if timeout is None:
        return await call
    try:
        return await asyncio.wait_for(call, timeout)
    except TimeoutError as exc:
        ctx.request_stop("timeout")
        raise AttemptTimeout(f"attempt {job.attempt} timed out after {timeout}s") from exc


def _encode_result(value: Any) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"task result is not JSON-serialisable: {exc}") from exc


def _failure(
    job: Job,
    token: int,
    exc: BaseException,
    policy: RetryPolicy,
    *,
    delay: timedelta | None = None,
) -> Outcome:
    error = error_record(exc, job.attempt)
    if job.attempt >= job.max_attempts:
        log.warning(
            "job %s (%s) failed for good after %d attempts: %r", job.id, job.task, job.attempt, exc
        )
        return Outcome(job.id, token, "failed", error=error)
    wait = delay if delay is not None else policy(job.attempt)
    log.info(
        "job %s (%s) attempt %d failed (%r); retry in %s", job.id, job.task, job.attempt, exc, wait
    )
    return Outcome.retry(job.id, token, wait, error)


def executor_failure(job: Job, token: int, exc: BaseException) -> Outcome:
    """The outcome when conveyor itself failed around an attempt (a bug, not the task's)."""
    return _failure(job, token, exc, DEFAULT_RETRY)
