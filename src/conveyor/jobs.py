r"""Job records and the job state machine.

```
   enqueue with a delay            enqueue
          |                           |
          v                           v
    [scheduled] ---------------> [available] <------------------------------+
       |  |      (claimable once      |                                     |
       |  |       run_at is due)      | claim: attempt + 1, new lease        | retry without delay,
       |  +-------------+------------+   token (job_claim_many)             | shutdown return,
       |                v                                                   | lost-claim release
       |            [running] --- retry / snooze with a delay,              |
       |            /  |  |  \     rescue of an expired lease --> [scheduled]
       |  success  /   |  |   \  failure at max attempts (or rescue past it)
       |          v    |  |    v
       |  [succeeded]  |  |  [failed]
       |               |  |
       | cancel        |  | Cancel raised, or a cancel request seen by the
       v               v  v worker, the rescuer, a retry or a release
 [cancelled] <----------------
```

A due `scheduled` job is claimed directly (no promotion step): the claim
indexes order waiting jobs whatever the waiting state. `succeeded`, `failed`
and `cancelled` are terminal: nothing changes them again. A running job holds
a lease (expiry + fencing token); only a write carrying the current token may
move it on (job_finish_many, worker_heartbeat, job_rescue_many re-checks it).
A cancel request on a running job wins over any later retry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime, time
from enum import StrEnum
from typing import Any, Self


class JobState(StrEnum):
    """Where a job is in its life; compares equal to its string value."""

    SCHEDULED = "scheduled"
    AVAILABLE = "available"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """True for the states a job never leaves."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class RowRecord:
    """A snapshot built from a query row: columns it does not declare are ignored."""

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Self:
        """Build from a `SELECT *`-style row as a dict."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in row.items() if k in known})


@dataclass(frozen=True, kw_only=True)
class Job:
    """A snapshot of one job row."""

    id: int
    queue: str
    task: str
    args: dict[str, Any]
    state: JobState
    priority: int
    attempt: int
    max_attempts: int
    run_at: datetime
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    lease_token: int | None = None
    lease_expires_at: datetime | None = None
    worker_id: str | None = None
    timeout_ms: int | None = None
    result: Any = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    concurrency_key: str | None = None
    cancel_requested_at: datetime | None = None
    window_start: time | None = None
    window_end: time | None = None
    window_tz: str | None = None
    dedup_key: str | None = None
    run_id: int | None = None
    """The pipeline run this job is a step (or the cleanup) of."""
    run_context: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    """For a claimed pipeline job: its run as of the claim (input, metadata,
    results it depends on), so the step starts without another query."""

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        """Build a Job from a `SELECT * FROM jobs` row as a dict."""
        known = {k: v for k, v in row.items() if k in _FIELDS}
        known["state"] = job_state(known["state"])
        if len(known) < len(_FIELDS):
            if not _PLAIN_DEFAULTS.keys() >= _FIELDS - known.keys():
                return cls(**known)
            known = {**_PLAIN_DEFAULTS, **known}
        return cls.from_fields(known)

    @classmethod
    def from_fields(cls, fields: dict[str, Any], /, **overrides: Any) -> Job:
        """Build from `fields` updated with `overrides`, together holding every
        field, `state` already a JobState.

        Claims and bulk enqueues build one per job: this skips the frozen
        `__init__`'s per-field `object.__setattr__` (4x faster), and fills the
        new job's own dict without building another to copy.
        """
        job = object.__new__(cls)
        job.__dict__.update(fields)
        job.__dict__.update(overrides)
        return job

    @property
    def is_finished(self) -> bool:
        """True once the job reached a terminal state."""
        return self.state.is_terminal


_FIELDS = frozenset(Job.__dataclass_fields__)
_PLAIN_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(Job) if f.default is not dataclasses.MISSING
}
"""Fields whose default is a plain value (not a factory), which a row may leave out."""


def job_state(value: str | JobState) -> JobState:
    """The JobState of a state column's value."""
    return _STATES[value]


_STATES: dict[str | JobState, JobState] = {state.value: state for state in JobState}
_STATES.update({state: state for state in JobState})


@dataclass(frozen=True, kw_only=True)
class WorkerInfo(RowRecord):
    """A snapshot of one worker process's registry row."""

    id: str
    host: str
    pid: int
    version: str
    schema_version: int
    queues: list[str]
    concurrency: int
    state: str
    """running, stopping, stopped or dead."""
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_s: float
    """Seconds since the last heartbeat, on the database clock."""
    stopped_at: datetime | None = None
    stop_requested_at: datetime | None = None
    running_jobs: int = 0
    leaked_slots: int = 0
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class KeyStats(RowRecord):
    """One concurrency key's limit and counts, exactly as of the last commit."""

    queue: str
    key: str
    concurrency_limit: int
    waiting: int
    """Jobs scheduled or available."""
    running: int
    total_enqueued: int
    total_succeeded: int
    total_failed: int
    total_cancelled: int
    updated_at: datetime
    max_queue_length: int | None = None
    rate_limit: int | None = None
    rate_period_s: float | None = None
    rate_window_start: datetime | None = None
    rate_window_count: int = 0
    served_at: datetime | None = None
    """When jobs of the key last started (its creation until then): claims
    take keys with room least recently served first."""


@dataclass(frozen=True, kw_only=True)
class QueueStats(RowRecord):
    """One queue's counts and totals, exactly as of the last commit."""

    queue: str
    waiting: int
    """Jobs scheduled or available."""
    running: int
    total_enqueued: int
    total_succeeded: int
    total_failed: int
    total_cancelled: int
    updated_at: datetime
