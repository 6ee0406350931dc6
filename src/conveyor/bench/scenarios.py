"""The benchmark scenarios of `conveyor bench`.

Each scenario takes a fresh database URL per measurement (see
`environment.fresh_database`) and returns plain numbers. Throughput is
measured on the database clock: finished jobs divided by the span from the
first start to the last finish, so worker start-up and the final poll do not
count. Nothing here asserts a speed; `make bench` reports.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import dict_row

from conveyor.app import App
from conveyor.bench.sample import NOOP, PIPELINE, PIPELINE_STEPS, build_app
from conveyor.config import ENV_DATABASE_URL, WorkerConfig
from conveyor.db.database import Row
from conveyor.db.explain import CLAIM_EXAMPLE, plan_nodes, scans
from conveyor.db.queries import parse_queries
from conveyor.tasks import JobSpec
from conveyor.worker.worker import Worker

Tick = Callable[[int, int], None]
"""Progress callback: (done, total)."""
FreshDatabase = Callable[[], AbstractContextManager[str]]
Result = dict[str, Any]

POLL_S = 0.01


@dataclass(frozen=True)
class Bench:
    """What every scenario gets: fresh databases, a progress callback, quick mode."""

    fresh: FreshDatabase
    tick: Tick
    quick: bool = False


async def _migrated(url: str) -> App:
    app = build_app(url)
    await app.migrate()
    return app


@cache
def _queries() -> dict[str, str]:
    text = resources.files("conveyor.bench").joinpath("queries.sql").read_text("utf-8")
    return parse_queries(text)


async def _query(url: str, name: str, params: dict[str, Any] | None = None) -> list[Row]:
    """Run a benchmark query on its own autocommit connection (outside any pool)."""
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row, application_name="bench"
    ) as conn:
        cur = await conn.execute(_queries()[name], params)
        return await cur.fetchall() if cur.description else []


async def _span(url: str, since: datetime | None = None) -> tuple[int, float]:
    """(finished jobs, seconds from first start to last finish) on the database clock;
    with `since`, of the jobs started since then only."""
    (row,) = await _query(url, "bench_span", {"since": since})
    return int(row["n"]), float(row["s"] or 0.0)


async def _drain(app: App, total: int, concurrency: int, tick: Tick) -> Worker:
    worker = Worker(app, WorkerConfig(concurrency=concurrency, poll_interval=timedelta(seconds=1)))
    await worker.start()
    while worker.stats.succeeded < total:
        tick(worker.stats.succeeded, total)
        await asyncio.sleep(POLL_S)
    tick(total, total)
    # Stop claiming now. Waiting for the worker to go idle first ran on for as
    # long as the queue had work: with a backlog, tens of thousands of jobs past
    # `total`, which the span then counted, each claim walking past more
    # claimed rows than the last.
    await worker.stop()
    return worker


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def _noop_specs(app: App, count: int) -> list[JobSpec]:
    spec = app.tasks[NOOP].job()
    return [spec] * count


# -- enqueue -------------------------------------------------------------------


async def enqueue(bench: Bench, *, single: int = 1_000, bulk: int = 100_000) -> Result:
    """Single enqueues from one connection (rate, p50/p99), then one bulk enqueue."""
    with bench.fresh() as url:
        app = await _migrated(url)
        noop = app.tasks[NOOP]
        timings: list[float] = []
        for index in range(single):
            started = time.perf_counter()
            await noop.enqueue()
            timings.append(time.perf_counter() - started)
            bench.tick(index + 1, single + bulk)
        started = time.perf_counter()
        await app.enqueue_many(_noop_specs(app, bulk))
        bulk_s = time.perf_counter() - started
        bench.tick(single + bulk, single + bulk)
        await app.close()
    return {
        "single": single,
        "single_jobs_per_s": round(single / sum(timings)),
        "single_p50_ms": round(_percentile(timings, 0.5) * 1000, 3),
        "single_p99_ms": round(_percentile(timings, 0.99) * 1000, 3),
        "bulk": bulk,
        "bulk_jobs_per_s": round(bulk / bulk_s),
    }


# -- throughput ------------------------------------------------------------------


async def throughput(bench: Bench, *, jobs: int, concurrency: int, processes: int = 0) -> Result:
    """`jobs` queued no-op jobs through one in-process worker, or `processes` worker
    processes of `concurrency` each; jobs/s until all finished."""
    with bench.fresh() as url:
        app = await _migrated(url)
        await app.enqueue_many(_noop_specs(app, jobs))
        # Planner statistics, as a running system has (the peers get the same).
        await _query(url, "bench_analyze")
        claims = None
        if processes:
            await _run_processes(app, url, jobs, concurrency, processes, bench.tick)
        else:
            worker = await _drain(app, jobs, concurrency, bench.tick)
            claims = worker.claims
        await app.close()
        done, seconds = await _span(url)
    assert done == jobs, f"{done} of {jobs} jobs succeeded"
    return {
        "jobs": jobs,
        "concurrency": concurrency,
        "worker_processes": processes or 1,
        "jobs_per_s": round(jobs / seconds),
        "span_jobs_per_s": round(jobs / seconds),
        "seconds": round(seconds, 3),
        "claims": claims,
    }


async def _run_processes(
    app: App, url: str, jobs: int, concurrency: int, processes: int, tick: Tick
) -> None:
    env = {**os.environ, ENV_DATABASE_URL: url}
    command = [
        sys.executable, "-m", "conveyor", "worker", "conveyor.bench.sample:app",
        "--concurrency", str(concurrency), "--log-level", "warning",
    ]  # fmt: skip
    procs = [await asyncio.create_subprocess_exec(*command, env=env) for _ in range(processes)]
    try:
        while True:
            counts = await app.counts()
            done = sum(by.get("succeeded", 0) for by in counts.values())
            tick(done, jobs)
            if done >= jobs:
                return
            if any(p.returncode is not None for p in procs):
                raise RuntimeError("a benchmark worker process exited early")
            await asyncio.sleep(0.05)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await asyncio.wait_for(proc.wait(), timeout=30)


# -- latency ---------------------------------------------------------------------


async def latency(bench: Bench, *, jobs: int = 200, rate_per_s: float = 50.0) -> Result:
    """Jobs enqueued one by one at `rate_per_s` into an idle worker: enqueue -> start,
    from the database's own timestamps of the two statements."""
    with bench.fresh() as url:
        app = await _migrated(url)
        worker = Worker(app, WorkerConfig(concurrency=10, poll_interval=timedelta(seconds=1)))
        await worker.start()
        noop = app.tasks[NOOP]
        interval = 1 / rate_per_s
        next_at = time.perf_counter()
        for index in range(jobs):
            await noop.enqueue()
            bench.tick(index + 1, jobs)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        while worker.stats.succeeded < jobs:  # noqa: ASYNC110 - sampling progress
            await asyncio.sleep(POLL_S)
        await worker.wait_until_idle()
        await worker.stop()
        delays = [float(r["ms"]) for r in await _query(url, "bench_start_delays")]
        await app.close()
    return {
        "jobs": jobs,
        "rate_per_s": rate_per_s,
        "p50_ms": round(statistics.median(delays), 3),
        "p99_ms": round(_percentile(delays, 0.99), 3),
        "max_ms": round(max(delays), 3),
    }


# -- keys ------------------------------------------------------------------------


async def keys(bench: Bench, *, jobs: int = 10_000, concurrency: int = 20) -> Result:
    """Plain jobs, one key with limit 10 (spec E extreme stress), and 100 keys with
    limit 2, in the same run; with FIFO violations counted per key."""
    results: Result = {"jobs": jobs, "concurrency": concurrency}
    cases: dict[str, Callable[[App], list[JobSpec]]] = {
        "plain": lambda app: _noop_specs(app, jobs),
        "one_key_limit_10": lambda app: (
            [app.tasks[NOOP].configure(concurrency_key="hot", concurrency_limit=10).job()] * jobs
        ),
        "hundred_keys_limit_2": lambda app: [
            app.tasks[NOOP].configure(concurrency_key=f"k{i % 100}", concurrency_limit=2).job()
            for i in range(jobs)
        ],
    }
    for name, specs in cases.items():
        with bench.fresh() as url:
            app = await _migrated(url)
            await app.enqueue_many(specs(app))
            await _drain(app, jobs, concurrency, bench.tick)
            await app.close()
            done, seconds = await _span(url)
            violations = await _fifo_violations(url)
        assert done == jobs
        results[f"{name}_jobs_per_s"] = round(jobs / seconds)
        results[f"{name}_fifo_violations"] = violations
    results["one_key_vs_plain"] = round(
        results["one_key_limit_10_jobs_per_s"] / results["plain_jobs_per_s"], 3
    )
    results["hundred_keys_vs_plain"] = round(
        results["hundred_keys_limit_2_jobs_per_s"] / results["plain_jobs_per_s"], 3
    )
    return results


async def _fifo_violations(url: str) -> int:
    """Jobs of a key that started strictly before a job enqueued ahead of them."""
    (row,) = await _query(url, "bench_fifo_violations")
    return int(row["n"])


# -- pipelines -------------------------------------------------------------------


async def pipelines(bench: Bench, *, runs: int = 1_000, concurrency: int = 20) -> Result:
    """`runs` runs of a 5-step no-op pipeline through one worker; steps/s."""
    with bench.fresh() as url:
        app = await _migrated(url)
        pipe = app.pipelines[PIPELINE]
        started = time.perf_counter()
        for _ in range(runs):
            await pipe.start()
        start_s = time.perf_counter() - started
        total = runs * PIPELINE_STEPS
        await _drain(app, total, concurrency, bench.tick)
        counts = await app.runs.counts()
        await app.close()
        done, seconds = await _span(url)
    assert counts == {PIPELINE: {"succeeded": runs}}, counts
    return {
        "runs": runs,
        "steps_per_run": PIPELINE_STEPS,
        "concurrency": concurrency,
        "starts_per_s": round(runs / start_s),
        "steps_per_s": round(done / seconds),
        "runs_per_s": round(runs / seconds, 1),
    }


# -- backlog ---------------------------------------------------------------------


async def backlog(
    bench: Bench, *, waiting: tuple[int, ...] = (10_000, 100_000, 1_000_000), drained: int = 10_000
) -> Result:
    """Claim throughput of `drained` jobs with N jobs already waiting, and with N
    finished jobs in the table (bloat); the claim plan must stay an index scan."""
    results: Result = {"drained": drained, "concurrency": 20}
    for backlog_size in waiting:
        for history in (False, True):
            label = f"{'finished' if history else 'waiting'}_{backlog_size}"
            with bench.fresh() as url:
                app = await _migrated(url)
                if history:
                    await app.enqueue_many(_noop_specs(app, drained))
                # Last, so its VACUUM ANALYZE sees the table as the claims will.
                await _fill(url, backlog_size, finished=history)
                results[f"{label}_claim_index_scan"] = await _claim_uses_index(app)
                clock = (await _query(url, "bench_now"))[0]["now"]
                await _drain(app, drained, 20, bench.tick)
                await app.close()
                # The history's own start and finish times must not count, and
                # the worker may run past `drained` before it stops: count them all.
                done, seconds = await _span(url, since=clock)
            results[f"{label}_jobs_per_s"] = round(done / seconds)
    base = results[f"waiting_{waiting[0]}_jobs_per_s"]
    results["largest_vs_smallest"] = round(results[f"waiting_{waiting[-1]}_jobs_per_s"] / base, 3)
    return results


async def _fill(url: str, count: int, *, finished: bool) -> None:
    """Insert `count` no-op jobs straight into the table: waiting, or finished long ago."""
    state = "succeeded" if finished else "available"
    await _query(url, "bench_fill", {"task": NOOP, "state": state, "done": finished, "n": count})
    await _query(url, "bench_analyze")


async def _claim_uses_index(app: App) -> bool:
    async with app.db.connection() as conn:
        nodes = await plan_nodes(app.db, conn, "job_claim_many", CLAIM_EXAMPLE)
    found = scans(nodes)
    return ("Index Scan", "jobs", "jobs_claim_idx") in found and not any(
        kind == "Seq Scan" and relation == "jobs" for kind, relation, _ in found
    )


# -- connections -----------------------------------------------------------------


async def connections(bench: Bench, *, jobs: int = 10_000, concurrency: int = 200) -> Result:
    """One worker process at high concurrency: the most connections it held at once."""
    with bench.fresh() as url:
        app = await _migrated(url)
        await app.enqueue_many(_noop_specs(app, jobs))
        await app.close()
        peak = 0
        stop = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, application_name="bench-sampler", row_factory=dict_row
            ) as conn:
                while not stop.is_set():
                    cur = await conn.execute(_queries()["bench_connections"])
                    row = await cur.fetchone()
                    peak = max(peak, int(row["n"]) if row else 0)
                    await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample())
        worker_app = build_app(url)
        await _drain(worker_app, jobs, concurrency, bench.tick)
        await worker_app.close()
        stop.set()
        await sampler
        _, seconds = await _span(url)
    return {
        "jobs": jobs,
        "concurrency": concurrency,
        "peak_connections": peak,
        "jobs_per_s": round(jobs / seconds),
    }


Scenario = Callable[..., Awaitable[Result]]
SCENARIOS: dict[str, Scenario] = {
    "enqueue": enqueue,
    "throughput": throughput,
    "latency": latency,
    "keys": keys,
    "pipelines": pipelines,
    "backlog": backlog,
    "connections": connections,
}
