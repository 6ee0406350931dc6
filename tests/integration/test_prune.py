"""Retention: only terminal history older than the cutoff goes; totals and live work stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from conveyor import App, JobContext, WorkerConfig
from conveyor.cli.main import cli
from conveyor.errors import ConfigError, InvalidArguments
from conveyor.maintenance.rescuer import Rescuer
from conveyor.testing import advance_time, drain, freeze_time
from tests.integration.conftest import QueryDb

FROZEN = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


async def _history(app: App, query_db: QueryDb) -> dict[str, int]:
    rows = await query_db(
        "SELECT state::text AS state, count(*) AS n FROM conveyor.jobs GROUP BY 1"
    )
    return {r["state"]: int(r["n"]) for r in rows}


async def test_prune_deletes_only_old_finished_jobs_and_runs(app: App, query_db: QueryDb) -> None:
    @app.task(name="ok")
    async def ok(ctx: JobContext) -> None:
        await ctx.step("memo", lambda: 1)

    @app.task(name="bad", max_attempts=1)
    async def bad(ctx: JobContext) -> None:
        raise RuntimeError("no")

    pipe = app.pipeline("pruned")

    @pipe.step()
    async def only(ctx: JobContext) -> int:
        return 1

    await freeze_time(app, FROZEN)
    await app.enqueue_many([ok.job() for _ in range(3)] + [bad.job()])
    run = await pipe.start()
    await drain(app)
    await advance_time(app, timedelta(days=8))
    fresh = await ok.enqueue()
    waiting = await ok.configure(delay=timedelta(days=30)).enqueue()
    await drain(app)
    assert (await app.get_job(fresh.id)).state == "succeeded"

    report = await app.prune(older_than=timedelta(days=7), states=["succeeded"])
    assert report.jobs == 4 and report.runs == 1  # 3 ok + the pipeline step; the run
    assert await _history(app, query_db) == {"succeeded": 1, "failed": 1, "scheduled": 1}
    assert (await app.get_job(waiting.id)).state == "scheduled"
    assert await query_db("SELECT * FROM conveyor.checkpoints WHERE job_id <> %s", fresh.id) == []
    assert await query_db("SELECT * FROM conveyor.runs WHERE id = %s", run.id) == []
    # Totals survive the deletion.
    stats = {s.queue: s for s in await app.queue_stats()}
    assert stats["default"].total_succeeded == 5

    report = await app.prune(older_than=timedelta(days=7))
    assert report.jobs == 1  # the failed one
    assert await _history(app, query_db) == {"succeeded": 1, "scheduled": 1}


async def test_bad_retention_is_a_typed_error(app: App) -> None:
    with pytest.raises(InvalidArguments):
        await app.prune(older_than=timedelta(days=1), states=["running"])
    with pytest.raises(InvalidArguments):
        await app.prune(older_than=timedelta(0))
    with pytest.raises(ConfigError):
        WorkerConfig(retention={"available": timedelta(days=1)})
    with pytest.raises(ConfigError):
        WorkerConfig(retention={"succeeded": timedelta(0)})


async def test_the_rescuer_pass_applies_the_retention(app: App, query_db: QueryDb) -> None:
    @app.task(name="ok")
    async def ok(ctx: JobContext) -> None:
        return None

    await freeze_time(app, FROZEN)
    await app.enqueue_many([ok.job() for _ in range(12)])
    await drain(app)
    await advance_time(app, timedelta(hours=2))
    rescuer = Rescuer(
        app.db,
        interval=timedelta(seconds=5),
        dead_after=timedelta(seconds=60),
        retention={"succeeded": timedelta(hours=1)},
    )
    report = await rescuer.run_once()
    assert report.pruned == 12
    assert await _history(app, query_db) == {}


def test_prune_command(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", database_url)
    monkeypatch.setenv("CONVEYOR_SCHEMA", "conveyor")
    result = CliRunner().invoke(cli, ["prune", "--older-than", "7d", "--state", "succeeded"])
    assert result.exit_code == 0, result.output
    assert "pruned 0 job(s) and 0 run(s)" in result.output
    bad = CliRunner().invoke(cli, ["prune", "--older-than", "soon"])
    assert bad.exit_code == 2


async def test_a_run_whose_cleanup_has_not_run_is_kept(app: App, query_db: QueryDb) -> None:
    pipe = app.pipeline("kept")

    @pipe.step(max_attempts=1)
    async def breaks(ctx: JobContext) -> None:
        raise RuntimeError("no")

    @pipe.on_failure(queue="later")  # no worker serves it in this test
    async def cleanup(ctx: JobContext, failure: object) -> None:
        return None

    await freeze_time(app, FROZEN)
    run = await pipe.start()
    await drain(app)
    await advance_time(app, timedelta(days=8))
    report = await app.prune(older_than=timedelta(days=7))
    assert report.runs == 0 and report.jobs == 1  # the failed step job only
    kept = await app.runs.get(run.id)
    assert kept.state == "failed" and kept.cleanup_job_id is not None
    assert (await app.get_job(kept.cleanup_job_id)).state == "available"
