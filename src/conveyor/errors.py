"""The exceptions conveyor raises, in one hierarchy.

```
ConveyorError
 +-- ConfigError            invalid configuration (named field)
 |    +-- InvalidPipeline   a pipeline declaration with unknown steps, a cycle, a duplicate
 +-- TaskNotFound           a task name no registered task answers to
 +-- InvalidArguments       arguments that do not bind or are not JSON
 +-- InvalidJobOptions      bad enqueue options (negative delay, bad priority...)
 +-- PayloadTooLarge        encoded arguments over the configured limit
 +-- QueueFull              a queue cap would be exceeded
 +-- JobNotFound            a job id that does not exist
 +-- RunNotFound            a run id that does not exist
 +-- RunNotRetryable        a run that is not failed/cancelled, or still has a running step
 +-- NotInRun               `ctx.run` used by a job that is not a pipeline step
 +-- LeaseLost              a fenced write by an attempt that no longer holds its job
 +-- CounterLimitExceeded   `ctx.run.incr` went past its ceiling (fails the step for good)
 +-- LockError              a lock used wrongly (bad key, no transaction, not acquired)
 |    +-- LockNotOwned      release/extend by someone who does not hold the lock
 |    +-- LockLost          a held lock went away (TTL expired, connection lost)
 |    +-- LockTimeout       `async with lock:` could not acquire within its timeout
 +-- WaitTimeout            `App.wait` gave up before the job finished
 +-- SchemaVersionError     the database schema and this code disagree
 +-- DatabaseError          PostgreSQL refused a statement (SQLSTATE kept)
      +-- TransientDatabaseError   a failure worth retrying (already retried)
```

Every error raised for bad input is raised *before* anything is written.
"""

from __future__ import annotations

from conveyor.outcomes import Fail


class ConveyorError(Exception):
    """Base class of every error conveyor raises on purpose."""


class ConfigError(ConveyorError):
    """Raised when a configuration value is invalid; the message names the field."""


class TaskNotFound(ConveyorError):
    """Raised when enqueueing or running a task name that is not registered."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        hint = f" (known tasks: {', '.join(sorted(known))})" if known else ""
        super().__init__(f"unknown task {name!r}{hint}")
        self.name = name


class InvalidArguments(ConveyorError):
    """Raised when task arguments do not fit the task's signature or are not JSON."""


class InvalidJobOptions(ConveyorError):
    """Raised for invalid enqueue options: negative delay, out-of-range priority, etc."""


class PayloadTooLarge(ConveyorError):
    """Raised when a job's encoded arguments exceed `Config.max_payload_bytes`."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"job payload is {size} bytes, over the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class QueueFull(ConveyorError):
    """Raised when an enqueue would push a concurrency key past its `max_queue_length`.

    Nothing of the enqueue is written (a bulk enqueue is all or nothing).
    """

    def __init__(self, queue: str, key: str, waiting: int, incoming: int, cap: int) -> None:
        super().__init__(
            f"queue full: key {key!r} in queue {queue!r} has {waiting} waiting job(s) "
            f"and a cap of {cap}; refusing {incoming} more"
        )
        self.queue = queue
        self.key = key
        self.waiting = waiting
        self.incoming = incoming
        self.cap = cap


class JobNotFound(ConveyorError):
    """Raised when a job id does not exist."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} does not exist")
        self.job_id = job_id


class InvalidPipeline(ConfigError):
    """Raised when a pipeline declaration is invalid; nothing is registered."""


class RunNotFound(ConveyorError):
    """Raised when a run id does not exist."""

    def __init__(self, run_id: int) -> None:
        super().__init__(f"run {run_id} does not exist")
        self.run_id = run_id


class RunNotRetryable(ConveyorError):
    """Raised when retrying a run that did not fail or is still stopping a step."""


class NotInRun(ConveyorError):
    """Raised when `ctx.run` is used by a job that belongs to no pipeline run."""


class LeaseLost(ConveyorError):
    """Raised when a fenced write (run state, counter, checkpoint) comes from an
    attempt that no longer holds its job: nothing was written."""


class CounterLimitExceeded(ConveyorError, Fail):
    """Raised by `ctx.run.incr` past its ceiling; the step fails for good and the
    run halts (a loop bounded by the counter cannot go on forever)."""

    def __init__(self, name: str, value: int, limit: int) -> None:
        message = f"run counter {name!r} reached {value}, over its ceiling of {limit}"
        ConveyorError.__init__(self, message)
        self.reason = message
        self.name = name
        self.value = value
        self.limit = limit


class LockError(ConveyorError):
    """Raised when a lock is used in a way it cannot work (see the message)."""


class LockNotOwned(LockError):
    """Raised when releasing or extending a lock this owner does not hold; nothing changed."""


class LockLost(LockError):
    """Raised when a held lock went away (TTL expired, connection lost): the
    protected block must not go on as if it still held it."""


class LockTimeout(LockError, TimeoutError):
    """Raised by `async with lock:` when the lock was not acquired within the timeout."""


class WaitTimeout(ConveyorError, TimeoutError):
    """Raised by `App.wait` when the job is not finished within the timeout."""


class SchemaVersionError(ConveyorError):
    """Raised when the database schema is missing, newer, older or altered."""


class DatabaseError(ConveyorError):
    """Raised when PostgreSQL refuses a statement; `sqlstate` and `purpose` say what."""

    def __init__(self, purpose: str, message: str, sqlstate: str | None = None) -> None:
        code = f" [{sqlstate}]" if sqlstate else ""
        super().__init__(f"{purpose} failed{code}: {message}")
        self.purpose = purpose
        self.sqlstate = sqlstate


class TransientDatabaseError(DatabaseError):
    """Raised when a transient failure persisted through every retry."""
