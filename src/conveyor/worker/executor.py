"""Run one claimed job and turn whatever happens into an `Outcome`.

The executor never writes to the database; the completer does. Sync task
functions run in the worker's thread pool so they cannot block the loop.

When the worker asks an attempt to stop (`ctx.stop_reason`), the outcome
follows the reason: `shutdown` gives the job back with the attempt refunded,
`cancel` records `cancelled`, `timeout` is a failure retried per policy, and
`lease_lost` records nothing at all (the job is no longer ours to record).
An attempt that ignores cancellation for longer than the hard limit is
abandoned and reported as a leaked slot; its job still gets its outcome.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import timedelta
from typing import Any

from conveyor.codec import CodecError, compact_json
from conveyor.context import JobContext
from conveyor.errors import TaskNotFound
from conveyor.jobs import Job
from conveyor.outcomes import Cancel, Fail, Retry, Snooze
from conveyor.retry import DEFAULT_RETRY, RetryPolicy
from conveyor.tasks import Task
from conveyor.worker.outcome import Outcome, error_record

log = logging.getLogger("conveyor.worker")

OnLeak = Callable[["asyncio.Future[Any]", bool], None]
"""Called with an abandoned attempt still running, and whether it holds a thread."""


class AttemptTimeout(TimeoutError):
    """The attempt ran past its task's timeout."""


class CancelRequested(Exception):
    """Someone asked for this running job to be cancelled."""


async def execute(
    job: Job,
    task: Task | None,
    ctx: JobContext,
    threads: Executor,
    *,
    hard_limit: timedelta = timedelta(seconds=5),
    on_leak: OnLeak | None = None,
) -> Outcome | None:
    """Run `job` and return its outcome (None: record nothing); never raises."""
    assert job.lease_token is not None
    token = job.lease_token
    if task is None:
        return _failure(job, token, TaskNotFound(job.task), DEFAULT_RETRY)
    policy = task.options.retry
    try:
        if task.prepare is not None:
            await task.prepare(ctx)
        value = await _call(task, job, ctx, threads, hard_limit, on_leak)
        if ctx.stop_reason is None:
            encode = task.encode_result or _encode_result
            try:
                encoded = encode(value)
            except (TypeError, ValueError, CodecError) as exc:
                # Running again cannot make the result storable: fail for good.
                raise Fail(f"task result cannot be stored: {exc}") from exc
            return Outcome.succeeded(job.id, token, encoded)
    except (asyncio.CancelledError, Exception) as exc:
        if ctx.stop_reason is None:
            # Includes a CancelledError raised by the task's own code: only the
            # worker's requests (which set a stop reason) are not failures.
            return _outcome_of(exc, job, token, policy)
    return _stopped(job, token, ctx, policy)


def _stopped(job: Job, token: int, ctx: JobContext, policy: RetryPolicy) -> Outcome | None:
    """The outcome of an attempt the worker asked to stop, by reason."""
    reason = ctx.stop_reason
    if reason == "lease_lost":
        return None
    if reason == "cancel":
        error = error_record(
            CancelRequested("cancelled while running"), job.attempt, with_traceback=False
        )
        return Outcome(job.id, token, "cancelled", error=error)
    if reason == "timeout":
        return _failure(job, token, AttemptTimeout(_timeout_message(job)), policy)
    return Outcome.retry(job.id, token, timedelta(0), None, refund=True)


def _outcome_of(exc: BaseException, job: Job, token: int, policy: RetryPolicy) -> Outcome:
    """The outcome of an attempt that raised `exc`: an outcome signal or a failure."""
    if isinstance(exc, Snooze):
        return Outcome.retry(job.id, token, exc.delay, None, refund=True)
    if isinstance(exc, Cancel):
        error = error_record(exc, job.attempt, with_traceback=False)
        return Outcome(job.id, token, "cancelled", error=error)
    if isinstance(exc, Fail):
        log.warning("job %s (%s) failed for good: %s", job.id, job.task, exc)
        return Outcome(job.id, token, "failed", error=error_record(exc, job.attempt))
    if isinstance(exc, Retry):
        return _failure(job, token, exc, policy, delay=exc.delay)
    return _failure(job, token, exc, policy)


async def _call(
    task: Task,
    job: Job,
    ctx: JobContext,
    threads: Executor,
    hard_limit: timedelta,
    on_leak: OnLeak | None,
) -> Any:
    thread: concurrent.futures.Future[Any] | None = None
    if task.is_async:
        inner: asyncio.Future[Any] = asyncio.ensure_future(task.func(ctx, **job.args))
    else:
        thread = threads.submit(functools.partial(task.func, ctx, **job.args))
        inner = asyncio.wrap_future(thread)
    try:
        await _ended_or_timed_out(inner, None if job.timeout_ms is None else job.timeout_ms / 1000)
    except asyncio.CancelledError:
        # The worker cancelled us (shutdown, cancel, lease lost): pass it on.
        await _abandon(inner, thread, hard_limit, on_leak)
        raise
    if not inner.done():
        ctx.request_stop("timeout")
        await _abandon(inner, thread, hard_limit, on_leak)
        raise AttemptTimeout(_timeout_message(job))
    return inner.result()


async def _ended_or_timed_out(inner: asyncio.Future[Any], timeout: float | None) -> None:
    """Return when `inner` ends or `timeout` passes, whichever is first.

    What `asyncio.wait({inner}, timeout=...)` does, for a third of its cost: it
    runs once per job, and its set, waiter and callback bookkeeping showed up
    in profiles of short jobs.
    """
    loop = asyncio.get_running_loop()
    woken = loop.create_future()

    def wake(_: object = None) -> None:
        if not woken.done():
            woken.set_result(None)

    inner.add_done_callback(wake)
    timer = None if timeout is None else loop.call_later(timeout, wake)
    try:
        await woken
    finally:
        inner.remove_done_callback(wake)
        if timer is not None:
            timer.cancel()


async def _abandon(
    inner: asyncio.Future[Any],
    thread: concurrent.futures.Future[Any] | None,
    hard_limit: timedelta,
    on_leak: OnLeak | None,
) -> None:
    """Cancel the attempt and give it `hard_limit` to end; past that its slot is leaked.

    A thread cannot be interrupted: a sync task ends only when it returns (it
    should watch `ctx.cancelled`), so its end is watched on the thread's own future.
    """
    inner.cancel()
    watched = asyncio.wrap_future(thread) if thread is not None else inner
    done, _ = await asyncio.wait({watched}, timeout=hard_limit.total_seconds())
    if not done:
        log.error("an attempt ignored cancellation for %s: its slot is leaked", hard_limit)
        if on_leak is not None:
            on_leak(watched, thread is not None)
    elif not watched.cancelled():
        watched.exception()  # retrieve it, so asyncio does not log "never retrieved"


def _timeout_message(job: Job) -> str:
    seconds = (job.timeout_ms or 0) / 1000
    return f"attempt {job.attempt} timed out after {seconds}s"


def _encode_result(value: Any) -> str:
    try:
        return compact_json(value)
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
