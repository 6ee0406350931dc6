"""Property-based test of the concurrency-key invariants under random interleavings.

Hypothesis generates a list of operations, run one by one through the real SQL
statements (no worker processes): keyed (and some unkeyed) enqueues, a few
deduplicated or delayed; claims of random size by two worker ids; outcomes
written with the held lease token (success, failure, retry now or later, snooze,
cancel) or with a stale one; cancels of waiting and running jobs; runtime limit
changes; moves of the frozen database clock; rescue passes; and releases of the
claims a worker does not hold.

A model predicts every job's state, attempt, lease, run time and cancel request.
After every operation the database must agree with it, and:

1. no claim makes a key's running count exceed the key's limit at that claim
   (lowering a limit does not stop running jobs, so the bound is the limit of
   the key's last claim that started one of its jobs);
2. the FIFO history checker (tests/fifo_checker.py) recorded no violation;
3. the persisted `concurrency_keys` counts (and the per-queue `queue_stats`)
   equal a recount of the jobs table;
4. a finished job never changes again, and only running jobs hold a lease token;
5. an outcome written with a stale lease token changes nothing.

`test_claims_leave_no_due_work_behind` checks one more: a claim for `n` jobs
takes `n`, or every job a claim could start at that moment.

One database per test function; every example starts from empty tables and a
frozen clock. `--hypothesis-show-statistics` shows what the runs exercised.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conveyor import App, JobContext, Task
from conveyor.maintenance.rescuer import Rescuer
from conveyor.testing import advance_time, freeze_time
from tests.concurrency.procs import (
    KEY_COUNT_FIELDS,
    counts_differ,
    query,
    snapshot_key_counts,
)
from tests.fifo_checker import fifo_violations, install_fifo_checker

T = TypeVar("T")

FROZEN = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
QUEUE = "default"
KEYS = ("k1", "k2", "k3")
WORKERS = ("w1", "w2")
LEASE_S = 30.0
JOBS_CHANNEL = "conveyor.jobs"
RESCUE_BACKOFF_MAX_S = 300.0
"""The rescuer's default backoff: 1 s, 2 s, 4 s, ... capped at 5 minutes."""

WAITING = ("scheduled", "available")
LIVE = (*WAITING, "running")
TERMINAL = ("succeeded", "failed", "cancelled")

ERROR = '{"type": "ValueError", "message": "boom"}'
CANCEL_ERROR = '{"type": "conveyor.Cancelled", "message": "cancelled by task"}'
OUTCOMES: dict[str, tuple[str, str | None, str | None, float, bool]] = {
    # name: (state, result, error, retry_in_s, refund), as a worker writes them.
    "succeeded": ("succeeded", '{"ok": true}', None, 0.0, False),
    "failed": ("failed", None, ERROR, 0.0, False),
    "retry_now": ("retry", None, ERROR, 0.0, False),
    "retry_later": ("retry", None, ERROR, 5.0, False),
    "snooze_now": ("retry", None, None, 0.0, True),
    "snooze_later": ("retry", None, None, 5.0, True),
    "cancelled": ("cancelled", None, CANCEL_ERROR, 0.0, False),
}

RESET = """
TRUNCATE conveyor.jobs, conveyor.concurrency_keys, conveyor.queue_stats RESTART IDENTITY;
DELETE FROM public.fifo_violations;
"""

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


# -- operations --------------------------------------------------------------------
# Job choices are indexes into the jobs that qualify when the operation runs (0 is
# the oldest), so any list of operations is valid and shrinks well.


@dataclass(frozen=True)
class Enqueue:
    key: str | None
    dedup_keys: tuple[str | None, ...]
    """One job per entry; None: no dedup key."""
    limit: int
    delay_s: int
    max_attempts: int

    def apply(self, model: Model) -> None:
        model.enqueue(self)


@dataclass(frozen=True)
class Claim:
    n: int
    worker: str

    def apply(self, model: Model) -> None:
        model.claim(self)


@dataclass(frozen=True)
class Finish:
    picks: tuple[tuple[int, str, bool], ...]
    """(job index, outcome, stale): running jobs for a fresh write, else any job
    that was ever claimed, written with a token it no longer holds."""

    def apply(self, model: Model) -> None:
        model.finish(self)


@dataclass(frozen=True)
class Cancel:
    indexes: tuple[int, ...]
    live_only: bool

    def apply(self, model: Model) -> None:
        model.cancel(self)


@dataclass(frozen=True)
class SetLimit:
    key: str
    limit: int

    def apply(self, model: Model) -> None:
        model.set_limit(self)


@dataclass(frozen=True)
class Advance:
    seconds: int
    then_rescue: bool
    """Run a rescue pass after moving the clock (leases last 30 s)."""

    def apply(self, model: Model) -> None:
        model.advance(self)
        if self.then_rescue:
            model.rescue()


@dataclass(frozen=True)
class Rescue:
    def apply(self, model: Model) -> None:
        model.rescue()


@dataclass(frozen=True)
class ReleaseUnheld:
    worker: str
    keep: tuple[bool, ...]
    """Which of the worker's running jobs (oldest first) it still holds; the rest,
    and any past the end, are given back."""

    def apply(self, model: Model) -> None:
        model.release_unheld(self)


Operation = Enqueue | Claim | Finish | Cancel | SetLimit | Advance | Rescue | ReleaseUnheld

ENQUEUE = st.builds(
    Enqueue,
    key=st.sampled_from((*KEYS, *KEYS, None)),
    dedup_keys=st.lists(
        st.sampled_from((None, None, None, "d1", "d2")), min_size=1, max_size=3
    ).map(tuple),
    limit=st.integers(1, 3),
    delay_s=st.sampled_from((0, 0, 3)),
    max_attempts=st.integers(1, 3),
)
CLAIM = st.builds(Claim, n=st.integers(1, 3), worker=st.sampled_from(WORKERS))
FINISH = st.builds(
    Finish,
    picks=st.lists(
        st.tuples(
            st.integers(0, 20),
            st.sampled_from(sorted(OUTCOMES)),
            st.sampled_from((False, False, False, True)),
        ),
        min_size=1,
        max_size=3,
    ).map(tuple),
)
CANCEL = st.builds(
    Cancel,
    indexes=st.lists(st.integers(0, 20), min_size=1, max_size=2).map(tuple),
    live_only=st.sampled_from((True, True, False)),
)
SET_LIMIT = st.builds(SetLimit, key=st.sampled_from(KEYS), limit=st.integers(1, 3))
ADVANCE = st.builds(
    Advance,
    seconds=st.sampled_from((1, 3, 5, 31, 31, 61)),
    then_rescue=st.sampled_from((True, True, False)),
)
RELEASE = st.builds(
    ReleaseUnheld,
    worker=st.sampled_from(WORKERS),
    keep=st.lists(st.booleans(), max_size=2).map(tuple),
)
OPERATIONS = st.lists(
    # Repeats weigh the mix towards the busy path (one_of would treat them as one).
    st.sampled_from(
        [ENQUEUE] * 3 + [CLAIM] * 4 + [FINISH] * 4 + [ADVANCE] * 2
        + [CANCEL, SET_LIMIT, st.just(Rescue()), RELEASE, RELEASE]
    ).flatmap(lambda operation: operation),
    # At least 10 operations: shorter runs rarely get a key busy.
    min_size=10,
    max_size=30,
)  # fmt: skip


# -- the model ---------------------------------------------------------------------


@dataclass
class ModelJob:
    """What the model expects of one job row."""

    id: int
    key: str | None
    state: str
    run_at: datetime
    max_attempts: int
    dedup_key: str | None
    attempt: int = 0
    token: int | None = None
    worker: str | None = None
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False
    old_tokens: list[int] = field(default_factory=list)
    """Tokens of earlier attempts: a write carrying one of them is a zombie's."""

    def end_lease(self) -> None:
        if self.token is not None:
            self.old_tokens.append(self.token)
        self.token = None
        self.lease_expires_at = None


@dataclass
class Env:
    """The event loop, App and task that one test function's examples share."""

    runner: asyncio.Runner
    app: App
    task: Task

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)


@pytest.fixture
def env(database_url: str) -> Iterator[Env]:
    """One database for the whole test function, with the FIFO checker installed."""
    with asyncio.Runner() as runner:
        app = App(database_url, schema="conveyor")

        @app.task(name="prop")
        async def prop(ctx: JobContext, n: int) -> None: ...

        runner.run(install_fifo_checker(app))
        try:
            yield Env(runner, app, prop)
        finally:
            runner.run(app.close())
            app.db.close_sync()


async def recount_queues(app: App) -> dict[str, dict[str, int]]:
    """Per-queue counts and totals recomputed from the jobs table."""
    rows = await query(
        app,
        """
        SELECT queue,
               count(*) FILTER (WHERE state IN ('scheduled', 'available')) AS waiting,
               count(*) FILTER (WHERE state = 'running') AS running,
               count(*) AS total_enqueued,
               count(*) FILTER (WHERE state = 'succeeded') AS total_succeeded,
               count(*) FILTER (WHERE state = 'failed') AS total_failed,
               count(*) FILTER (WHERE state = 'cancelled') AS total_cancelled
        FROM conveyor.jobs GROUP BY queue
        """,
    )
    return {r["queue"]: {name: int(r[name]) for name in KEY_COUNT_FIELDS} for r in rows}


def pick(items: Sequence[T], index: int) -> T:
    """A shrink-friendly choice: index 0 is the first item."""
    return items[index % len(items)]


class Model:
    """The expected state of the jobs and keys, and the checks against the database."""

    def __init__(self, env: Env, *, check_claims_fill: bool) -> None:
        self.env = env
        self.app = env.app
        self.check_claims_fill = check_claims_fill
        self.env.run(query(self.app, RESET))
        self.env.run(freeze_time(self.app, FROZEN))
        self.now = FROZEN
        self.jobs: dict[int, ModelJob] = {}
        self.limits: dict[str, int] = {}
        self.claim_cap: dict[str, int] = {}
        """Per key: its limit at the last claim that started one of its jobs."""
        self.finished_rows: dict[int, dict[str, Any]] = {}
        self.max_token = 0

    # -- helpers -------------------------------------------------------------------

    def ids_in(self, *states: str) -> list[int]:
        return sorted(j.id for j in self.jobs.values() if j.state in states)

    def running_of(self, key: str) -> int:
        return sum(1 for j in self.jobs.values() if j.key == key and j.state == "running")

    def due_waiting(self, key: str | None) -> list[ModelJob]:
        """Waiting jobs of `key` that a claim may start now, in the order it must."""
        due = [
            j
            for j in self.jobs.values()
            if j.key == key and j.state in WAITING and j.run_at <= self.now
        ]
        if key is None:
            return sorted(due, key=lambda j: (j.run_at, j.id))
        return sorted(due, key=lambda j: j.id)

    def room(self, key: str) -> int:
        return max(self.limits[key] - self.running_of(key), 0)

    # -- operations ----------------------------------------------------------------

    def enqueue(self, op: Enqueue) -> None:
        options: dict[str, Any] = {
            "max_attempts": op.max_attempts,
            "delay": timedelta(seconds=op.delay_s) if op.delay_s else None,
        }
        if op.key is not None:
            options |= {"concurrency_key": op.key, "concurrency_limit": op.limit}
        specs = [
            self.env.task.configure(**options, dedup_key=d).job(n=n)
            for n, d in enumerate(op.dedup_keys)
        ]
        # Per position: the live job holding its dedup key, the earlier position
        # of this batch that creates that job, or None for a new job.
        live = {j.dedup_key: j.id for j in self.jobs.values() if j.dedup_key and j.state in LIVE}
        first_in_batch: dict[str, int] = {}
        expected: list[tuple[str, int] | None] = []
        for position, d in enumerate(op.dedup_keys):
            if d is not None and d in live:
                expected.append(("existing", live[d]))
            elif d is not None and d in first_in_batch:
                expected.append(("same_as", first_in_batch[d]))
            else:
                expected.append(None)
                if d is not None:
                    first_in_batch[d] = position

        jobs = self.env.run(self.app.enqueue_many(specs))

        assert len(jobs) == len(specs)
        event(f"enqueue: {sum(w is None for w in expected)} new of {len(specs)}")
        newest = max(self.jobs, default=0)
        state = "scheduled" if op.delay_s else "available"
        for position, (job, want) in enumerate(zip(jobs, expected, strict=True)):
            if want is None:
                assert job.id > newest, f"position {position}: new job {job.id} <= {newest}"
                assert job.state == state
                newest = job.id
                self.jobs[job.id] = ModelJob(
                    id=job.id,
                    key=op.key,
                    state=state,
                    run_at=self.now + timedelta(seconds=op.delay_s),
                    max_attempts=op.max_attempts,
                    dedup_key=op.dedup_keys[position],
                )
            elif want[0] == "existing":
                assert job.id == want[1], f"position {position}: deduplicated to {job.id}"
            else:
                assert job.id == jobs[want[1]].id
        if op.key is not None:
            # The first enqueue of a key sets its limit (even when every job of the
            # batch was deduplicated away); later enqueues never change it.
            self.limits.setdefault(op.key, op.limit)

    def claim(self, op: Claim) -> None:
        keys = sorted(self.limits)
        due = {key: self.due_waiting(key) for key in keys}
        room = {key: self.room(key) for key in keys}
        unkeyed = self.due_waiting(None)
        claimable = len(unkeyed) + sum(min(room[k], len(due[k])) for k in keys)

        rows = self.env.run(
            self.app.db.fetch(
                "claim",
                "job_claim_many",
                {"queues": [QUEUE], "limit": op.n, "worker_id": op.worker, "lease_s": LEASE_S},
            )
        )

        ids = [r["id"] for r in rows]
        event(f"claim: took {min(len(rows), 2)}{'+' * (len(rows) > 2)}")
        assert len(set(ids)) == len(ids) <= op.n, f"{op} returned {ids}"
        for row in rows:
            job = self.jobs[row["id"]]
            assert job.state in WAITING and job.run_at <= self.now, f"claimed {job}"
        by_key: dict[str | None, list[int]] = {}
        for row in rows:
            by_key.setdefault(row["concurrency_key"], []).append(row["id"])
        for key, taken in by_key.items():
            order = [j.id for j in (unkeyed if key is None else due[key])]
            taken.sort(key=order.index)
            # A key's claimed jobs are its first due ones, in id order.
            assert taken == order[: len(taken)], f"key {key}: took {taken}, due {order}"
            if key is not None:
                # Invariant 1, at the claim itself.
                assert len(taken) <= room[key], (
                    f"key {key}: started {len(taken)} with room {room[key]}"
                    f" (limit {self.limits[key]}, running {self.running_of(key)})"
                )
        if self.check_claims_fill:
            assert len(rows) == min(op.n, claimable), (
                f"{op} took {ids} but {claimable} job(s) could start: "
                + "; ".join(
                    f"{k} room {room[k]} due {[j.id for j in due[k]]}"
                    for k in keys
                    if room[k] and due[k]
                )
                + (f"; unkeyed due {[j.id for j in unkeyed]}" if unkeyed else "")
            )

        for row in sorted(rows, key=lambda r: r["lease_token"]):
            job = self.jobs[row["id"]]
            assert row["lease_token"] > self.max_token, "lease tokens must grow"
            assert row["attempt"] == job.attempt + 1
            assert row["worker_id"] == op.worker
            assert row["started_at"] == self.now
            self.max_token = row["lease_token"]
            job.state = "running"
            job.attempt += 1
            job.token = row["lease_token"]
            job.worker = op.worker
            job.lease_expires_at = self.now + timedelta(seconds=LEASE_S)
        for key in by_key:
            if key is not None:
                assert self.running_of(key) <= self.limits[key]
                self.claim_cap[key] = self.limits[key]

    def outcome_batch(self, op: Finish) -> dict[int, tuple[int, str, bool]]:
        """Job id -> (token, outcome, stale) for the jobs `op` picks (each once)."""
        running = self.ids_in("running")
        ever_claimed = sorted(j.id for j in self.jobs.values() if j.token or j.old_tokens)
        batch: dict[int, tuple[int, str, bool]] = {}
        for index, outcome, want_stale in op.picks:
            stale = want_stale or not running
            job = self.jobs[pick(ever_claimed if stale else running, index)]
            if job.id in batch:
                continue
            if not stale:
                assert job.token is not None
                token = job.token
            elif job.old_tokens:
                token = job.old_tokens[-1]
            else:
                assert job.token is not None
                token = job.token - 1
            batch[job.id] = (token, outcome, stale)
        return batch

    def finish(self, op: Finish) -> None:
        """Write outcomes in one batch as a worker does: the held token, or a stale one."""
        if not any(j.token or j.old_tokens for j in self.jobs.values()):
            event("finish: nothing claimed yet")
            return
        ordered = sorted(self.outcome_batch(op).items())
        params = {
            "id": [job_id for job_id, _ in ordered],
            "token": [token for _, (token, _, _) in ordered],
            "state": [OUTCOMES[o][0] for _, (_, o, _) in ordered],
            "result": [OUTCOMES[o][1] for _, (_, o, _) in ordered],
            "error": [OUTCOMES[o][2] for _, (_, o, _) in ordered],
            "retry_in_s": [OUTCOMES[o][3] for _, (_, o, _) in ordered],
            "refund": [OUTCOMES[o][4] for _, (_, o, _) in ordered],
            "channel": JOBS_CHANNEL,
        }

        rows = self.env.run(self.app.db.fetch("finish", "job_finish_many", params))

        for job_id, (_, outcome, stale) in ordered:
            job = self.jobs[job_id]
            cancel = " (cancel requested)" if job.cancel_requested else ""
            event(f"finish: {'stale ' * stale}{outcome} of a {job.state} job{cancel}")
        # Invariant 5: stale tokens are refused; the model check after this
        # operation shows that their rows did not change either.
        fresh = {job_id: outcome for job_id, (_, outcome, stale) in ordered if not stale}
        written = sorted(r["id"] for r in rows)
        assert written == sorted(fresh), f"finish {ordered}: wrote {written}, expected {fresh}"
        for job_id, outcome in fresh.items():
            job = self.jobs[job_id]
            state, _, _, retry_in_s, refund = OUTCOMES[outcome]
            if state != "retry":
                job.state = state
            elif job.cancel_requested:
                # A pending cancel request wins over any retry.
                job.state = "cancelled"
            else:
                job.state = "scheduled" if retry_in_s > 0 else "available"
                job.run_at = self.now + timedelta(seconds=retry_in_s)
            if refund:
                job.attempt -= 1
            job.end_lease()

    def cancel(self, op: Cancel) -> None:
        if not self.jobs:
            event("cancel: no jobs yet")
            return
        candidates = (self.ids_in(*LIVE) if op.live_only else []) or sorted(self.jobs)
        ids = sorted({pick(candidates, i) for i in op.indexes})
        expected: dict[int, str] = {}
        for job_id in ids:
            job = self.jobs[job_id]
            if job.state in WAITING:
                expected[job_id] = "cancelled"
            elif job.state == "running":
                expected[job_id] = "cancel_requested"

        outcome = self.env.run(self.app.cancel_many(ids=ids))

        event(f"cancel: {sorted(set(expected.values())) or 'finished jobs only'}")
        assert outcome == expected
        for job_id, what in expected.items():
            if what == "cancelled":
                self.jobs[job_id].state = "cancelled"
            else:
                self.jobs[job_id].cancel_requested = True

    def set_limit(self, op: SetLimit) -> None:
        stats = self.env.run(self.app.set_limit(op.key, op.limit, queue=QUEUE))
        assert stats.concurrency_limit == op.limit
        self.limits[op.key] = op.limit

    def advance(self, op: Advance) -> None:
        moved = self.env.run(advance_time(self.app, timedelta(seconds=op.seconds)))
        self.now += timedelta(seconds=op.seconds)
        assert moved == self.now

    def rescue(self) -> None:
        expected: dict[int, str] = {}
        for job in self.jobs.values():
            if job.state != "running" or job.lease_expires_at is None:
                continue
            if job.lease_expires_at >= self.now:
                continue
            if job.cancel_requested:
                expected[job.id] = "cancelled"
            elif job.attempt >= job.max_attempts:
                expected[job.id] = "failed"
            else:
                expected[job.id] = "scheduled"
        rescuer = Rescuer(
            self.app.db, interval=timedelta(seconds=1), dead_after=timedelta(minutes=1)
        )

        report = self.env.run(rescuer.run_once())

        event(f"rescue: {sorted(set(expected.values())) or 'nothing'}")
        assert report.ran
        assert report.rescued == expected
        for job_id, state in expected.items():
            job = self.jobs[job_id]
            backoff = min(2.0 ** max(job.attempt - 1, 0), RESCUE_BACKOFF_MAX_S)
            job.state = state
            job.run_at = self.now + timedelta(seconds=backoff)
            job.end_lease()

    def release_unheld(self, op: ReleaseUnheld) -> None:
        """A claim's outcome was lost: the worker gives back what it does not hold."""
        mine = [
            j.id for j in sorted(self.jobs.values(), key=lambda j: j.id)
            if j.state == "running" and j.worker == op.worker
        ]  # fmt: skip
        held = [job_id for i, job_id in enumerate(mine) if i < len(op.keep) and op.keep[i]]
        released = sorted(set(mine) - set(held))

        rows = self.env.run(
            self.app.db.fetch(
                "release",
                "job_release_unheld",
                {"worker_id": op.worker, "held": held, "channel": JOBS_CHANNEL},
            )
        )

        event(f"release: {min(len(released), 2)}{'+' * (len(released) > 2)} job(s)")
        assert sorted(r["id"] for r in rows) == released
        for job_id in released:
            job = self.jobs[job_id]
            job.state = "cancelled" if job.cancel_requested else "available"
            job.attempt -= 1
            job.end_lease()

    # -- invariants ----------------------------------------------------------------

    def check(self) -> None:
        """Everything that must hold between any two operations."""
        self.check_jobs()
        self.check_keys()
        # Invariant 2: no job started while an earlier due job of its key waited.
        assert self.env.run(fifo_violations(self.app)) == []

    def check_jobs(self) -> None:
        rows = self.env.run(query(self.app, "SELECT * FROM conveyor.jobs ORDER BY id"))
        assert [r["id"] for r in rows] == sorted(self.jobs)
        for row in rows:
            job = self.jobs[row["id"]]
            seen = {
                "state": row["state"],
                "key": row["concurrency_key"],
                "attempt": row["attempt"],
                "token": row["lease_token"],
                "lease_expires_at": row["lease_expires_at"],
                "run_at": row["run_at"],
                "cancel_requested": row["cancel_requested_at"] is not None,
                "finished": row["finished_at"] is not None,
            }
            want = {
                "state": job.state,
                "key": job.key,
                "attempt": job.attempt,
                "token": job.token,
                "lease_expires_at": job.lease_expires_at,
                "run_at": job.run_at,
                "cancel_requested": job.cancel_requested,
                "finished": job.state in TERMINAL,
            }
            assert seen == want, f"job {job.id}: database {seen} != model {want}"
            if job.state == "running":
                assert row["worker_id"] == job.worker
            # Invariant 4: a lease only while running; a finished row never changes.
            assert (row["lease_token"] is None) == (row["state"] != "running")
            if row["id"] in self.finished_rows:
                assert row == self.finished_rows[row["id"]], f"finished job {row['id']} changed"
            elif row["state"] in TERMINAL:
                self.finished_rows[row["id"]] = row

    def check_keys(self) -> None:
        rows = self.env.run(
            query(
                self.app,
                "SELECT key, concurrency_limit FROM conveyor.concurrency_keys WHERE queue = %s",
                [QUEUE],
            )
        )
        assert {r["key"]: r["concurrency_limit"] for r in rows} == self.limits
        # Invariant 3: persisted counts == a recount, both read in one snapshot.
        stats, recounted = self.env.run(snapshot_key_counts(self.app))
        assert counts_differ(stats, recounted) == {}
        queues = {
            s.queue: {name: getattr(s, name) for name in KEY_COUNT_FIELDS}
            for s in self.env.run(self.app.queue_stats())
        }
        assert queues == self.env.run(recount_queues(self.app))
        # Invariant 1: running never exceeds the limit at the key's last claim.
        for key in self.limits:
            running = self.running_of(key)
            cap = self.claim_cap.get(key, 0)
            assert running <= cap, f"key {key}: {running} running, limit at last claim {cap}"


def run_operations(env: Env, operations: list[Operation], *, check_claims_fill: bool) -> None:
    model = Model(env, check_claims_fill=check_claims_fill)
    model.check()
    for step, operation in enumerate(operations):
        try:
            operation.apply(model)
            model.check()
        except AssertionError as exc:
            exc.add_note(f"at step {step}: {operation}")
            raise


@SETTINGS
@given(operations=OPERATIONS)
def test_key_invariants_hold_under_random_interleavings(
    env: Env, operations: list[Operation]
) -> None:
    run_operations(env, operations, check_claims_fill=False)


@SETTINGS
@given(operations=OPERATIONS)
def test_claims_leave_no_due_work_behind(env: Env, operations: list[Operation]) -> None:
    """A claim for n jobs takes n, or every job that could start now: keys whose
    waiting jobs are not due yet must not use up the claim's keys."""
    run_operations(env, operations, check_claims_fill=True)
