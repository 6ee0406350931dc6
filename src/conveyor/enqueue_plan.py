"""How a batch of encoded jobs becomes insert statements, and how results map back.

Pure module. Jobs without a dedup key are inserted in input order, so their
ids follow it. Jobs with a dedup key may instead resolve to an existing live
job (`on_conflict="ignore"`), or replace a waiting one in place
(`"supersede"`); either way each input position gets the job that now stands
for it, so `enqueue_many` returns one job per spec, in input order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from conveyor.codec import jsonb_loads
from conveyor.jobs import Job, job_state
from conveyor.tasks import EncodedJob

INSERT_CHUNK = 5_000
"""Bulk inserts are split so one statement's arrays stay a few MB at most."""

DedupKey = tuple[str, str]


@dataclass
class InsertPlan:
    """The statements one enqueue_many sends, in order."""

    statements: list[tuple[bool, Sequence[EncodedJob]]] = field(default_factory=list)
    """(supersede, jobs) per job_insert_many statement."""
    supersede_running: list[DedupKey] = field(default_factory=list)
    dedup_keys: list[DedupKey] = field(default_factory=list)

    @property
    def needs_transaction(self) -> bool:
        """More than one statement must commit together."""
        return len(self.statements) > 1 or bool(self.supersede_running) or bool(self.dedup_keys)


def plan_insert(jobs: Sequence[EncodedJob]) -> InsertPlan:
    """Split `jobs` into chunks of plain inserts and one superseding insert."""
    plan = InsertPlan()
    plain: list[EncodedJob] = []
    first_of_key: set[DedupKey] = set()
    superseding: dict[DedupKey, EncodedJob] = {}
    for job in jobs:
        key = None if job.dedup_key is None else (job.task, job.dedup_key)
        if key is not None and job.on_conflict == "supersede":
            # The last enqueue of a key wins (one statement cannot update a row twice).
            superseding[key] = job
        elif key is None or key not in first_of_key:
            # Later specs of a key resolve to the first one's job (see `assemble`).
            plain.append(job)
            if key is not None:
                first_of_key.add(key)
    for start in range(0, len(plain), INSERT_CHUNK):
        plan.statements.append((False, plain[start : start + INSERT_CHUNK]))
    if superseding:
        plan.statements.append((True, list(superseding.values())))
        plan.supersede_running = [k for k, j in superseding.items() if j.supersede_running]
    plan.dedup_keys = sorted({(j.task, j.dedup_key) for j in jobs if j.dedup_key is not None})
    return plan


def missing_dedup_keys(plan: InsertPlan, rows: Sequence[dict[str, Any]]) -> list[DedupKey]:
    """Dedup keys whose job was not returned by the inserts (an existing job stands for it)."""
    returned = {(r["task"], r["dedup_key"]) for r in rows if r.get("dedup_key") is not None}
    return [k for k in plan.dedup_keys if k not in returned]


def deduplicated_ids(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Inserted rows with a dedup key: they may be an older job's (superseded), read whole."""
    return [r["id"] for r in rows if r["dedup_key"] is not None]


def assemble(
    jobs: Sequence[EncodedJob],
    inserted: Sequence[dict[str, Any]],
    whole: Sequence[dict[str, Any]],
) -> list[Job]:
    """One job per input position: new ones by id order, deduplicated ones by key.

    `inserted` are the insert's own short rows; `whole` are full rows of every
    job that stands for a dedup key (superseded or pre-existing).
    """
    by_key: dict[DedupKey, Job] = {}
    for row in whole:
        by_key[(row["task"], row["dedup_key"])] = Job.from_row(row)
    plain = sorted((row for row in inserted if row["dedup_key"] is None), key=lambda r: r["id"])
    new_rows: Iterator[dict[str, Any]] = iter(plain)
    return [
        by_key[(j.task, j.dedup_key)] if j.dedup_key is not None else _new_job(j, next(new_rows))
        for j in jobs
    ]


def _new_job(job: EncodedJob, row: dict[str, Any]) -> Job:
    """The snapshot of a job just inserted: the database's decisions, the caller's options."""
    return Job.from_fields(
        NEW_JOB_DEFAULTS,
        id=row["id"],
        queue=job.queue,
        task=job.task,
        args=jsonb_loads(job.args),
        state=job_state(row["state"]),
        priority=job.priority,
        max_attempts=job.max_attempts,
        run_at=row["run_at"],
        created_at=row["created_at"],
        timeout_ms=job.timeout_ms,
        errors=[],
        meta=jsonb_loads(job.meta),
        concurrency_key=job.concurrency_key,
        window_start=job.window_start,
        window_end=job.window_end,
        window_tz=job.window_tz,
    )


NEW_JOB_DEFAULTS: dict[str, Any] = {
    "attempt": 0,
    **dict.fromkeys(
        (
            "started_at", "finished_at", "lease_token", "lease_expires_at", "worker_id",
            "result", "cancel_requested_at", "dedup_key", "run_id", "run_context",
        )
    ),
}  # fmt: skip
"""A new row's columns the insert leaves at their defaults."""
