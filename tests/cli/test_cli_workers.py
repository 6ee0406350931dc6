"""`conveyor workers`, `workers stop`, `cancel` and the workers line of `status`, against
in-process workers (each in a thread with its own event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from types import TracebackType

import psycopg
import pytest
from rich.console import Console
from typer.testing import CliRunner

from conveyor import App, Worker, WorkerConfig
from conveyor.cli import main as cli_main
from conveyor.cli.main import cli
from conveyor.migrations.migrator import latest_version

SAMPLE = "tests.cli.sample_app:app"
WAIT_S = 15.0
runner = CliRunner()


@pytest.fixture
def cli_env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point the CLI (and the sample app, imported fresh) at this test's database."""
    monkeypatch.setenv("CONVEYOR_DATABASE_URL", database_url)
    monkeypatch.setenv("CONVEYOR_SCHEMA", "conveyor")
    # Wide enough that rich tables never wrap a worker id, whatever the terminal.
    monkeypatch.setattr(cli_main, "console", Console(width=200))
    sys.modules.pop("tests.cli.sample_app", None)
    yield database_url
    sys.modules.pop("tests.cli.sample_app", None)


class ThreadedWorker:
    """A real Worker running in a background thread on its own event loop."""

    def __init__(self, url: str, worker_id: str) -> None:
        self.url = url
        self.worker_id = worker_id
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: Worker | None = None
        self._thread = threading.Thread(target=self._main, name=f"test-{worker_id}", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self.error = exc
        finally:
            self.ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        async with App(self.url, schema="conveyor") as app:
            config = WorkerConfig(poll_interval=timedelta(milliseconds=100), run_rescuer=False)
            self._worker = Worker(app, config, worker_id=self.worker_id)
            await self._worker.start()
            await asyncio.wait_for(self._worker.connected.wait(), WAIT_S)
            self.ready.set()
            await self._worker.run()  # until a (remote) stop

    def __enter__(self) -> ThreadedWorker:
        self._thread.start()
        assert self.ready.wait(WAIT_S), "worker did not start"
        if self.error is not None:
            raise self.error
        return self

    def exited(self, timeout: float = WAIT_S) -> bool:
        """Wait for the worker's `run` to return by itself."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread.is_alive() and self._loop is not None and self._worker is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                self._loop.call_soon_threadsafe(self._worker.request_stop)
        self._thread.join(WAIT_S)
        assert not self._thread.is_alive(), "worker thread did not exit"
        if self.error is not None and kind is None:
            raise self.error


def register_stopped(url: str, worker_id: str) -> None:
    """A worker row in state `stopped`: start and stop a worker."""

    async def lifecycle() -> None:
        async with App(url, schema="conveyor") as app:
            worker = Worker(app, WorkerConfig(run_rescuer=False), worker_id=worker_id)
            await worker.start()
            await worker.stop()

    asyncio.run(lifecycle())


def sql(url: str, query: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params or None)
        return list(cur.fetchall()) if cur.description else []


def flat(output: str) -> str:
    return " ".join(output.split())


def test_workers_lists_live_workers_and_all_with_flag(cli_env: str) -> None:
    register_stopped(cli_env, "cli-old")
    with ThreadedWorker(cli_env, "cli-live"):
        live = runner.invoke(cli, ["workers"])
        assert live.exit_code == 0, live.output
        line = next(row for row in live.output.splitlines() if "cli-live" in row)
        assert "running" in line
        assert "default" in line
        assert f"(schema {latest_version()})" in line
        assert "cli-old" not in live.output

        everything = runner.invoke(cli, ["workers", "--all"])
        assert everything.exit_code == 0, everything.output
        old_line = next(row for row in everything.output.splitlines() if "cli-old" in row)
        assert "stopped" in old_line
        assert "cli-live" in everything.output


def test_workers_stop_by_id_stops_that_worker(cli_env: str) -> None:
    with ThreadedWorker(cli_env, "cli-stop-me") as worker, ThreadedWorker(cli_env, "cli-keep"):
        result = runner.invoke(cli, ["workers", "stop", "cli-stop-me"])
        assert result.exit_code == 0, result.output
        assert "stop requested: cli-stop-me" in result.output
        assert worker.exited(), "the worker did not stop on request"
        rows = dict(
            (r[0], r[1:])
            for r in sql(
                cli_env,
                "SELECT id, state::text, stop_requested_at IS NOT NULL FROM conveyor.workers",
            )
        )
        assert rows == {"cli-stop-me": ("stopped", True), "cli-keep": ("running", False)}

        listed = runner.invoke(cli, ["workers"])
        assert "cli-keep" in listed.output
        assert "cli-stop-me" not in listed.output


def test_workers_stop_all(cli_env: str) -> None:
    with ThreadedWorker(cli_env, "cli-a") as a, ThreadedWorker(cli_env, "cli-b") as b:
        result = runner.invoke(cli, ["workers", "stop", "--all"])
        assert result.exit_code == 0, result.output
        assert "stop requested: cli-a" in result.output
        assert "stop requested: cli-b" in result.output
        assert a.exited()
        assert b.exited()
    states = sql(cli_env, "SELECT state::text FROM conveyor.workers")
    assert states == [("stopped",), ("stopped",)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["workers", "stop"], "give a worker id or --all"),
        (["workers", "stop", "some-id", "--all"], "give a worker id or --all"),
        (["workers", "stop", "no-such-worker"], "no live worker 'no-such-worker'"),
        (["workers", "stop", "--all"], "no live worker"),
    ],
)
def test_workers_stop_bad_requests_exit_2(cli_env: str, argv: list[str], message: str) -> None:
    result = runner.invoke(cli, argv)
    assert result.exit_code == 2, result.output
    assert message in flat(result.output)


def test_cancel_command_cancels_waiting_and_asks_running_jobs(cli_env: str) -> None:
    ids = []
    for a in range(2):
        enqueued = runner.invoke(
            cli, ["enqueue", SAMPLE, "multiply", "--args", json.dumps({"a": a, "b": 2})]
        )
        assert enqueued.exit_code == 0, enqueued.output
        ids.append(json.loads(enqueued.output)["id"])
    waiting, running = ids
    # The second one is running on a worker that is not listening.
    sql(
        cli_env,
        "UPDATE conveyor.jobs SET state = 'running', attempt = 1, worker_id = 'elsewhere', "
        "lease_token = nextval('conveyor.lease_token_seq'), "
        "lease_expires_at = now() + interval '1 minute' WHERE id = %s",
        running,
    )

    result = runner.invoke(cli, ["cancel", str(waiting), str(running), "999999"])
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert f"job {waiting}: cancelled" in out
    assert f"job {running}: cancel_requested" in out
    assert "job 999999: not cancellable (finished or unknown)" in out

    rows = sql(
        cli_env,
        "SELECT id, state::text, cancel_requested_at IS NOT NULL FROM conveyor.jobs ORDER BY id",
    )
    assert rows == [(waiting, "cancelled", False), (running, "running", True)]

    again = runner.invoke(cli, ["cancel", str(waiting)])
    assert again.exit_code == 0
    assert f"job {waiting}: not cancellable" in flat(again.output)


def test_status_reports_live_workers_and_leaked_slots(cli_env: str) -> None:
    quiet = runner.invoke(cli, ["status"])
    assert quiet.exit_code == 0, quiet.output
    assert "workers: 0 live, 0 jobs running, 0 leaked slot(s)" in flat(quiet.output)

    register_stopped(cli_env, "cli-gone")
    register_stopped(cli_env, "cli-leaky")
    # Make one of them look live with a stuck attempt, as its heartbeat would report it.
    sql(
        cli_env,
        "UPDATE conveyor.workers SET state = 'running', stopped_at = NULL, running_jobs = 2, "
        "leaked_slots = 1 WHERE id = 'cli-leaky'",
    )
    result = runner.invoke(cli, ["status"])
    assert result.exit_code == 0, result.output
    out = flat(result.output)
    assert "workers: 1 live, 2 jobs running, 1 leaked slot(s)" in out
    assert "attempts ignoring cancellation" in out

    sql(cli_env, "UPDATE conveyor.workers SET stop_requested_at = now() WHERE id = 'cli-leaky'")
    listed = runner.invoke(cli, ["workers"])
    assert listed.exit_code == 0, listed.output
    line = next(row for row in listed.output.splitlines() if "cli-leaky" in row)
    cells = [cell.strip() for cell in line.split("│")[1:-1]]
    assert cells[0] == "cli-leaky"
    assert cells[1] == "running (stop requested)"
    assert (cells[3], cells[4]) == ("2", "1")  # running, leaked
    assert "cli-gone" not in listed.output
