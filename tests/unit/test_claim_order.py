"""The order a worker starts a claimed batch in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from conveyor.jobs import Job, JobState
from conveyor.worker.producer import claim_order

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _job(job_id: int, *, key: str | None = None, priority: int = 0, late: int = 0) -> Job:
    return Job(
        id=job_id,
        queue="default",
        task="t",
        args={},
        state=JobState.RUNNING,
        priority=priority,
        attempt=1,
        max_attempts=3,
        run_at=T0 + timedelta(seconds=late),
        created_at=T0,
        concurrency_key=key,
    )


def test_a_keys_jobs_start_in_id_order_even_when_a_later_one_was_due_first() -> None:
    # Job 1 is a retried head (later run_at); job 2 of the same key must not start first.
    batch = [_job(2, key="k"), _job(1, key="k", late=30), _job(3)]
    assert [j.id for j in claim_order(batch)] == [3, 1, 2]


def test_unkeyed_jobs_start_by_priority_then_run_time_then_id() -> None:
    batch = [_job(5), _job(4, priority=3), _job(6, late=-5)]
    assert [j.id for j in claim_order(batch)] == [4, 6, 5]
