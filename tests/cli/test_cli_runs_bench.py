"""`conveyor runs` (list, show, cancel, retry) and `conveyor bench` (a quick smoke run)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from conveyor import App, JobContext, RunFailure
from conveyor.cli.main import cli
from conveyor.testing import drain

runner = CliRunner()


@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point the CLI at this test's database."""
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", database_url)
    monkeypatch.setenv("CONVEYOR_SCHEMA", "conveyor")
    yield database_url


def _pipeline(app: App) -> None:
    pipe = app.pipeline("cli_orders")

    @pipe.step()
    async def reserve(ctx: JobContext) -> dict[str, int]:
        return {"items": ctx.run.input["items"]}

    @pipe.step(max_attempts=1)
    async def charge(ctx: JobContext) -> None:
        if ctx.run.input["items"] > 3:
            raise RuntimeError("card declined")

    @pipe.on_failure()
    async def release(ctx: JobContext, failure: RunFailure) -> None:
        return None


async def _start_runs(database_url: str) -> dict[str, int]:
    """Four runs: one succeeds, one fails for good, two share a key; then drained."""
    app = App(database_url, schema="conveyor")
    _pipeline(app)
    pipe = app.pipelines["cli_orders"]
    runs = {
        "ok": await pipe.start({"items": 1}, metadata={"triggered_by": "cli-test"}),
        "bad": await pipe.start({"items": 9}),
        "first": await pipe.start({"items": 2}, key="shop-1"),
        "behind": await pipe.start({"items": 2}, key="shop-1"),
    }
    await drain(app)
    await app.close()
    return {name: run.id for name, run in runs.items()}


async def _state(database_url: str, run_id: int) -> str:
    app = App(database_url, schema="conveyor")
    try:
        return str((await app.runs.get(run_id)).state)
    finally:
        await app.close()


def test_runs_lists_shows_cancels_and_retries(cli_env: str) -> None:
    ids = asyncio.run(_start_runs(cli_env))

    listed = runner.invoke(cli, ["runs"])
    assert listed.exit_code == 0, listed.output
    for run_id in ids.values():
        assert str(run_id) in listed.output

    failed = runner.invoke(cli, ["runs", "--state", "failed"])
    assert failed.exit_code == 0, failed.output
    assert "cli_orders" in failed.output and "charge" in failed.output

    shown = runner.invoke(cli, ["runs", "show", str(ids["ok"])])
    assert shown.exit_code == 0, shown.output
    assert "cli-test" in shown.output and "reserve" in shown.output
    assert "succeeded" in shown.output

    retried = runner.invoke(cli, ["runs", "retry", str(ids["bad"])])
    assert retried.exit_code == 0, retried.output
    assert f"run {ids['bad']}: running" in retried.output

    refused = runner.invoke(cli, ["runs", "retry", str(ids["ok"])])
    assert refused.exit_code == 2
    assert "only failed or cancelled runs" in refused.output

    cancelled = runner.invoke(cli, ["runs", "cancel", str(ids["bad"])])
    assert cancelled.exit_code == 0, cancelled.output
    assert f"run {ids['bad']}: cancelled" in cancelled.output
    assert asyncio.run(_state(cli_env, ids["bad"])) == "cancelled"

    missing = runner.invoke(cli, ["runs", "show", "999999"])
    assert missing.exit_code == 2
    assert "does not exist" in missing.output

    bad_state = runner.invoke(cli, ["runs", "--state", "bogus"])
    assert bad_state.exit_code == 2


def test_bench_refuses_an_unknown_scenario(cli_env: str) -> None:
    result = runner.invoke(cli, ["bench", "nonsense"])
    assert result.exit_code == 2
    assert "unknown scenario" in result.output


def test_bench_quick_enqueue_prints_a_json_report(cli_env: str) -> None:
    result = runner.invoke(cli, ["bench", "enqueue", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["scenario"] == "enqueue"
    assert report["machine"]["postgres"]["server_version"]
    (run,) = report["runs"]
    assert run["params"] == {"single": 200, "bulk": 10_000}
    assert set(run["results"]) >= {"single_jobs_per_s", "single_p50_ms", "bulk_jobs_per_s"}
