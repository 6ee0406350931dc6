"""Configuration: frozen dataclasses, validated once, the bad field named in the error.

Environment variables are read at the edge only: `Config.from_env`, the CLI,
and the fallbacks used when no URL is configured (`db/connect.py`, `embedded.py`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from datetime import timedelta

from conveyor.errors import ConfigError

# PostgreSQL folds unquoted identifiers to lower case and truncates them at 63
# bytes; accepting only this shape means a schema name never needs quoting
# surprises and can never smuggle SQL.
# 50 leaves room for the `<schema>.jobs` NOTIFY channel within PostgreSQL's
# 63-byte identifier limit.
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,49}$")

ENV_DATABASE_URL = "CONVEYOR_DATABASE_URL"
ENV_SCHEMA = "CONVEYOR_SCHEMA"
ENV_SESSION_URL = "CONVEYOR_SESSION_URL"

DEFAULT_SCHEMA = "conveyor"
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
"""1 MiB: large enough for real arguments, small enough to keep claims fast."""


@dataclass(frozen=True, kw_only=True)
class Config:
    """How an `App` reaches and uses PostgreSQL."""

    database_url: str | None = None
    """libpq URL or DSN. None: `CONVEYOR_DATABASE_URL`, else the embedded PostgreSQL."""
    schema: str = DEFAULT_SCHEMA
    """Schema holding conveyor's tables; several apps can share a database."""
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    """Largest encoded job arguments accepted by enqueue, in bytes."""
    pool_size: int = 3
    """Most connections the App's pool opens (a worker adds one control-session connection)."""
    connect_timeout: timedelta = timedelta(seconds=10)
    """How long to wait for a new connection before failing."""
    statement_retries: int = 5
    """How many times a transient database failure is retried before it is raised."""
    prepare_threshold: int | None = 5
    """Executions before psycopg prepares a statement server-side; None disables
    (for PgBouncer < 1.21 in transaction mode)."""
    session_url: str | None = None
    """A direct (or session-pooled) URL of the same database for a worker's control
    session, when `database_url` leads through a transaction-mode pooler: LISTEN
    needs a session of its own. None: `database_url`."""

    def __post_init__(self) -> None:
        if not isinstance(self.schema, str) or not _SCHEMA_NAME.fullmatch(self.schema):
            raise ConfigError(
                f"Config.schema {self.schema!r} must match {_SCHEMA_NAME.pattern} "
                "(lower-case letters, digits and underscores)"
            )
        _positive("Config.max_payload_bytes", self.max_payload_bytes)
        _positive("Config.pool_size", self.pool_size)
        _positive_duration("Config.connect_timeout", self.connect_timeout)
        if self.statement_retries < 0:
            raise ConfigError("Config.statement_retries must be >= 0")

    @classmethod
    def from_env(cls, **overrides: object) -> Config:
        """Build a Config from `CONVEYOR_DATABASE_URL` / `CONVEYOR_SCHEMA` /
        `CONVEYOR_SESSION_URL`, then `overrides`."""
        values: dict[str, object] = {}
        if url := os.environ.get(ENV_DATABASE_URL):
            values["database_url"] = url
        if schema := os.environ.get(ENV_SCHEMA):
            values["schema"] = schema
        if session_url := os.environ.get(ENV_SESSION_URL):
            values["session_url"] = session_url
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]

    def with_database_url(self, url: str) -> Config:
        """A copy of this config pointing at `url`."""
        return replace(self, database_url=url)


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """How a worker process fetches, runs and records jobs."""

    queues: tuple[str, ...] = ("default",)
    """Queues this worker claims from."""
    concurrency: int = 10
    """Jobs run at once in this process."""
    poll_interval: timedelta = timedelta(seconds=1)
    """Fallback poll when no NOTIFY arrives (delayed jobs, lost notifications)."""
    lease_duration: timedelta = timedelta(seconds=20)
    """How long a claim stays valid without a heartbeat; a crashed worker's jobs
    are rescued at most `lease_duration + rescue_interval` after its last beat."""
    heartbeat_interval: timedelta = timedelta(seconds=5)
    """How often the worker renews the leases of its running jobs (4 beats per lease:
    three may be lost before a lease expires)."""
    rescue_interval: timedelta = timedelta(seconds=5)
    """How often this worker's rescuer looks for expired leases (one rescuer works
    at a time across all workers)."""
    dead_after: timedelta = timedelta(seconds=60)
    """A worker silent this long is marked dead in the registry."""
    cancel_hard_limit: timedelta = timedelta(seconds=5)
    """How long an attempt asked to stop (timeout, cancel, shutdown) may ignore it
    before its slot is abandoned and reported as leaked."""
    run_rescuer: bool = True
    """Take part in rescuing expired leases (off only in tests that rescue by hand)."""
    flush_interval: timedelta = timedelta(milliseconds=20)
    """Longest a finished job's outcome waits in the buffer before it is written."""
    flush_size: int = 200
    """Outcomes written in one statement at most."""
    shutdown_grace: timedelta = timedelta(seconds=10)
    """How long a stopping worker lets running jobs finish before it returns them."""
    sync_threads: int | None = None
    """Threads for sync task functions; None means `concurrency`."""
    listen: bool = True
    """Use LISTEN/NOTIFY wake-ups (off for poolers that cannot LISTEN)."""
    retention: dict[str, timedelta] = field(default_factory=dict)
    """Per terminal state, how long finished jobs and runs are kept; the rescuer
    pass deletes older ones (`{"succeeded": timedelta(days=1)}`). Empty: keep all."""
    extra: dict[str, str] = field(default_factory=dict)
    """Free-form labels recorded with the worker."""

    def __post_init__(self) -> None:
        if not self.queues or any(not q for q in self.queues):
            raise ConfigError("WorkerConfig.queues must name at least one non-empty queue")
        _positive("WorkerConfig.concurrency", self.concurrency)
        _positive("WorkerConfig.flush_size", self.flush_size)
        for name in (
            "poll_interval",
            "lease_duration",
            "heartbeat_interval",
            "flush_interval",
            "rescue_interval",
            "dead_after",
            "cancel_hard_limit",
        ):
            _positive_duration(f"WorkerConfig.{name}", getattr(self, name))
        if self.shutdown_grace < timedelta(0):
            raise ConfigError("WorkerConfig.shutdown_grace must not be negative")
        if self.heartbeat_interval >= self.lease_duration:
            raise ConfigError("WorkerConfig.heartbeat_interval must be shorter than lease_duration")
        if self.dead_after <= self.heartbeat_interval:
            raise ConfigError("WorkerConfig.dead_after must be longer than heartbeat_interval")
        if self.sync_threads is not None:
            _positive("WorkerConfig.sync_threads", self.sync_threads)
        for state, age in self.retention.items():
            if state not in ("succeeded", "failed", "cancelled"):
                raise ConfigError(f"WorkerConfig.retention: {state!r} is not a terminal state")
            _positive_duration(f"WorkerConfig.retention[{state!r}]", age)


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _positive_duration(name: str, value: timedelta) -> None:
    if value <= timedelta(0):
        raise ConfigError(f"{name} must be a positive duration, got {value}")
