"""The command line, in-process (typer's runner) and as real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from conveyor.cli.main import cli

REPO = Path(__file__).resolve().parents[2]
SAMPLE = "tests.cli.sample_app:app"
runner = CliRunner()


@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point the CLI (and the sample app, imported fresh) at this test's database."""
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", database_url)
    monkeypatch.setenv("CONVEYOR_SCHEMA", "conveyor")
    sys.modules.pop("tests.cli.sample_app", None)
    yield database_url
    sys.modules.pop("tests.cli.sample_app", None)


def _jobs(url: str) -> list[tuple[str, str, dict[str, int]]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT task, state::text, args FROM conveyor.jobs ORDER BY id")
        return list(rows.fetchall())


def test_migrate_fresh_schema_then_up_to_date(cli_env: str) -> None:
    first = runner.invoke(cli, ["migrate", "--schema", "cli_schema"])
    assert first.exit_code == 0, first.output
    assert "applied migrations 1" in first.output
    second = runner.invoke(cli, ["migrate", "--schema", "cli_schema"])
    assert second.exit_code == 0
    assert "up to date" in second.output


def test_migrate_rejects_bad_schema_name(cli_env: str) -> None:
    result = runner.invoke(cli, ["migrate", "--schema", "x; drop table y"])
    assert result.exit_code == 2
    assert "Config.schema" in result.output


def test_enqueue_prints_job_and_writes_it(cli_env: str) -> None:
    result = runner.invoke(cli, ["enqueue", SAMPLE, "multiply", "--args", '{"a": 6, "b": 7}'])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["task"] == "multiply"
    assert printed["state"] == "available"
    assert _jobs(cli_env) == [("multiply", "available", {"a": 6, "b": 7})]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["enqueue", SAMPLE, "nope"], "unknown task 'nope'"),
        (["enqueue", SAMPLE, "multiply", "--args", "{not json"], "not valid JSON"),
        (["enqueue", SAMPLE, "multiply", "--args", "[1, 2]"], "must be a JSON object"),
        (["enqueue", SAMPLE, "multiply", "--args", '{"a": 1}'], "missing a required argument"),
        (["enqueue", "tests.cli.sample_app", "multiply"], "must look like"),
        (["enqueue", "tests.cli.missing_module:app", "multiply"], "cannot import module"),
        (["enqueue", "tests.cli.sample_app:nothing", "multiply"], "has no attribute"),
        (["enqueue", "tests.cli.sample_app:not_an_app", "multiply"], "not a conveyor App"),
        (["worker", "tests.cli.sample_app:nothing"], "has no attribute"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(
    cli_env: str, argv: list[str], message: str
) -> None:
    result = runner.invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert _jobs(cli_env) == []


def test_status_shows_counts(cli_env: str) -> None:
    for a in range(3):
        runner.invoke(cli, ["enqueue", SAMPLE, "multiply", "--args", json.dumps({"a": a, "b": 2})])
    result = runner.invoke(cli, ["status"])
    assert result.exit_code == 0, result.output
    line = next(row for row in result.output.splitlines() if "default" in row)
    assert "3" in line


def test_worker_refuses_an_unknown_event_loop(cli_env: str) -> None:
    result = runner.invoke(cli, ["worker", SAMPLE, "--loop", "trio"])
    assert result.exit_code == 2, result.output
    assert "event loop (--loop or CONVEYOR_EVENT_LOOP) must be one of" in result.output
    assert "'trio'" in result.output


def test_partitions_create_list_and_remove(cli_env: str) -> None:
    empty = runner.invoke(cli, ["partitions"])
    assert empty.exit_code == 0, empty.output
    assert "(none" in empty.output
    runner.invoke(cli, ["enqueue", SAMPLE, "multiply", "--args", '{"a": 1, "b": 2}'])

    created = runner.invoke(cli, ["partitions", "create", "multiply"])
    assert created.exit_code == 0, created.output
    table = created.output.split("partition ")[1].strip()
    assert table.startswith("jobs_task_multiply_")
    listed = runner.invoke(cli, ["partitions"])
    assert table in listed.output and "multiply" in listed.output
    assert _jobs(cli_env) == [("multiply", "available", {"a": 1, "b": 2})]

    removed = runner.invoke(cli, ["partitions", "remove", "multiply"])
    assert (removed.exit_code, removed.output.strip()) == (0, "multiply: partition removed")
    again = runner.invoke(cli, ["partitions", "remove", "multiply"])
    assert (again.exit_code, again.output.strip()) == (0, "multiply: had no partition")
    assert _jobs(cli_env) == [("multiply", "available", {"a": 1, "b": 2})]


def test_partitions_create_refuses_an_empty_task_name(cli_env: str) -> None:
    result = runner.invoke(cli, ["partitions", "create", ""])
    assert result.exit_code == 2, result.output
    assert "non-empty task name" in result.output
    assert "(none" in runner.invoke(cli, ["partitions"]).output


@pytest.mark.parametrize(
    ("listen", "loop"), [("--listen", "auto"), ("--no-listen", "auto"), ("--listen", "asyncio")]
)
def test_worker_subprocess_runs_jobs_and_stops_on_sigterm(
    cli_env: str, listen: str, loop: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    enqueue = subprocess.run(
        [sys.executable, "-m", "conveyor", "enqueue", SAMPLE, "multiply", "--args",
         '{"a": 3, "b": 5}'],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert enqueue.returncode == 0, enqueue.stderr
    job_id = json.loads(enqueue.stdout)["id"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "worker", SAMPLE, "--concurrency", "2",
         "--poll-interval", "0.2", listen, "--loop", loop],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        state = None
        while time.monotonic() < deadline:
            with psycopg.connect(cli_env) as conn:
                row = conn.execute(
                    "SELECT state::text, result FROM conveyor.jobs WHERE id = %s", (job_id,)
                ).fetchone()
            assert row is not None
            state = row[0]
            if state == "succeeded":
                assert row[1] == 15
                break
            time.sleep(0.1)
        assert state == "succeeded"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0
        assert worker.stderr is not None
        # auto: uvloop where installed (the dev extra has it wherever it builds).
        expected = "uvloop" if loop == "auto" and find_spec("uvloop") else "asyncio"
        assert f"loop={expected}" in worker.stderr.read().decode()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
