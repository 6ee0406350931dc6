"""The job state machine's vocabulary and the shipped migration files."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from importlib import resources

from conveyor import Job, JobState
from conveyor.jobs import TERMINAL_STATES
from conveyor.migrations.migrator import available_migrations, latest_version


def test_terminal_states_are_succeeded_failed_and_cancelled() -> None:
    assert {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED} == TERMINAL_STATES
    assert {s for s in JobState if s.is_terminal} == TERMINAL_STATES
    assert not JobState.SCHEDULED.is_terminal
    assert not JobState.AVAILABLE.is_terminal
    assert not JobState.RUNNING.is_terminal


def test_job_state_compares_equal_to_its_string() -> None:
    state: object = JobState.SUCCEEDED
    assert state == "succeeded"
    assert JobState("running") is JobState.RUNNING
    assert f"{JobState.FAILED}" == "failed"
    assert {"available": 1}[JobState.AVAILABLE] == 1


def test_job_state_values_match_the_database_enum() -> None:
    initial = available_migrations()[0].text
    for state in JobState:
        assert f"'{state.value}'" in initial


def test_job_from_row_ignores_unknown_columns_and_types_the_state() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    row = {
        "id": 1,
        "queue": "default",
        "task": "t",
        "args": {},
        "state": "cancelled",
        "priority": 0,
        "attempt": 1,
        "max_attempts": 3,
        "run_at": now,
        "created_at": now,
        "finished_at": now,
        "a_column_from_a_future_migration": 42,
    }
    job = Job.from_row(row)
    assert job.state is JobState.CANCELLED
    assert job.is_finished
    assert job.errors == []


def test_available_migrations_are_numbered_from_one_without_gaps() -> None:
    migrations = available_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert latest_version() == migrations[-1].version
    assert migrations[0].name == "initial"


def test_migration_checksum_is_the_sha256_of_the_shipped_file() -> None:
    migrations = resources.files("conveyor.migrations")
    for migration in available_migrations():
        shipped = migrations.joinpath(f"{migration.version:04d}_{migration.name}.sql")
        text = shipped.read_text(encoding="utf-8")
        assert migration.checksum == hashlib.sha256(text.encode()).hexdigest()


def test_migration_checksum_is_stable_across_loads() -> None:
    first = [m.checksum for m in available_migrations()]
    available_migrations.cache_clear()
    second = [m.checksum for m in available_migrations()]
    assert first == second
    assert all(len(c) == 64 for c in first)
