"""Helpers for racing real processes: worker subprocesses and bounded waits on the database.

Every wait has a deadline and polls (the database or a file); nothing sleeps
a fixed time to synchronise. A worker that dies while a test waits on it
fails the wait at once, with its log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from conveyor import App
from conveyor.maintenance.rescuer import Rescuer, RescueReport

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_MODULE = "tests.concurrency.worker_main"

RESCUE_LOCK_TIMEOUT_S = 10.0
"""How long `rescue_once` keeps trying while a worker's own rescuer holds the lock."""

POLL_S = 0.05
"""Pause between two looks at the database or the file system while waiting."""
READY_TIMEOUT_S = 30.0
"""Start-up of a worker process (interpreter, imports, connections) on a busy 2-core box."""
EXIT_TIMEOUT_S = 30.0
"""A graceful stop: grace period plus flushing, with a wide margin."""
LOG_TAIL_CHARS = 6_000


@dataclass
class WorkerProcess:
    """One worker subprocess started by `start_worker`."""

    popen: subprocess.Popen[bytes]
    name: str
    log_path: Path
    ready_path: Path
    stopping_path: Path
    stats_path: Path
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def log(self) -> str:
        """The tail of everything the process wrote to stdout/stderr."""
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except FileNotFoundError:
            return ""

    def check_alive(self) -> None:
        """Fail the test if the process has exited."""
        code = self.popen.poll()
        if code is not None:
            raise AssertionError(f"worker {self.name} exited early ({code}):\n{self.log()}")

    async def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until the worker is listening and has made its first claim."""
        await wait_for_file(self.ready_path, timeout, procs=[self])
        self.info = json.loads(self.ready_path.read_text())

    def terminate(self) -> None:
        """Send SIGTERM (a graceful stop)."""
        self.popen.send_signal(signal.SIGTERM)

    async def wait_stopping(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until the worker's signal handler has run."""
        await wait_for_file(self.stopping_path, timeout)

    async def wait_exit(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        """Wait for the process to exit and return its status; fails past `timeout`."""
        try:
            return await asyncio.to_thread(self.popen.wait, timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.name} still running after {timeout}s:\n{self.log()}"
            ) from None

    async def stop(self, timeout: float = EXIT_TIMEOUT_S) -> None:
        """SIGTERM, then require a clean exit with status 0."""
        self.terminate()
        code = await self.wait_exit(timeout)
        assert code == 0, f"worker {self.name} exited {code}:\n{self.log()}"

    def stats(self) -> dict[str, Any]:
        """The worker's final counters, written after a graceful stop."""
        stats: dict[str, Any] = json.loads(self.stats_path.read_text())
        return stats

    def pause(self) -> None:
        """SIGSTOP: the process freezes mid-whatever, like a VM paused or a long GC."""
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused process."""
        self.popen.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL this process if it is still running, and reap it."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=EXIT_TIMEOUT_S)


class StartWorker(Protocol):
    """Starts a worker subprocess on the test's database (the `start` fixture)."""

    def __call__(self, name: str, **options: Any) -> WorkerProcess: ...


def start_worker(
    database_url: str,
    workdir: Path,
    name: str,
    *,
    concurrency: int = 5,
    poll_interval: float = 0.2,
    shutdown_grace: float = 10.0,
    lease_duration: float = 30.0,
    heartbeat_interval: float = 5.0,
    rescue_interval: float = 5.0,
    run_rescuer: bool = True,
    env: Mapping[str, str] | None = None,
    queues: Sequence[str] | None = None,
    pool_size: int | None = None,
    pooled: bool = False,
) -> WorkerProcess:
    """Start `tests.concurrency.worker_main` on `database_url`; files go to `workdir`;
    `env` adds environment variables (read by the sample tasks); `queues` and
    `pool_size` default to the worker's and the App's configuration; `pooled`
    when `database_url` leads through a transaction-mode pooler."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = {kind: workdir / f"{name}.{kind}" for kind in ("log", "ready", "stopping", "stats")}
    for path in paths.values():
        path.unlink(missing_ok=True)
    env = {
        **os.environ,
        "CONVEYOR_DATABASE_URL": database_url,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p
        ),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    command = [
        sys.executable,
        "-m",
        WORKER_MODULE,
        f"--ready-file={paths['ready']}",
        f"--stopping-file={paths['stopping']}",
        f"--stats-file={paths['stats']}",
        f"--concurrency={concurrency}",
        f"--poll-interval={poll_interval}",
        f"--shutdown-grace={shutdown_grace}",
        f"--lease-duration={lease_duration}",
        f"--heartbeat-interval={heartbeat_interval}",
        f"--rescue-interval={rescue_interval}",
        *([] if run_rescuer else ["--no-rescuer"]),
        *([] if queues is None else [f"--queues={','.join(queues)}"]),
        *([] if pool_size is None else [f"--pool-size={pool_size}"]),
        *(["--pooled"] if pooled else []),
    ]
    with paths["log"].open("wb") as log:
        popen = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    return WorkerProcess(
        popen=popen,
        name=name,
        log_path=paths["log"],
        ready_path=paths["ready"],
        stopping_path=paths["stopping"],
        stats_path=paths["stats"],
    )


@contextmanager
def worker_launcher(database_url: str, workdir: Path, **fixed: Any) -> Iterator[StartWorker]:
    """A `StartWorker` for `database_url` (each worker also gets the `fixed` options).
    On exit every worker still running is killed and every worker's log is
    printed (pytest shows it when the test failed)."""
    started: list[WorkerProcess] = []

    def launch(name: str, **options: Any) -> WorkerProcess:
        proc = start_worker(database_url, workdir, name, **fixed, **options)
        started.append(proc)
        return proc

    try:
        yield launch
    finally:
        for proc in started:
            proc.kill()
            print(f"--- worker {proc.name} (pid {proc.pid}, exit {proc.popen.returncode}):")
            print(proc.log())


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    *,
    procs: Iterable[WorkerProcess] = (),
) -> None:
    """Poll `condition` until it is true; fail after `timeout` or if a process dies."""
    watched = list(procs)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        for proc in watched:
            proc.check_alive()
        if loop.time() > deadline:
            logs = "\n".join(f"--- {p.name}:\n{p.log()}" for p in watched)
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{logs}")
        await asyncio.sleep(POLL_S)


async def wait_for_file(path: Path, timeout: float, *, procs: Iterable[WorkerProcess] = ()) -> None:
    """Wait until `path` exists."""

    async def exists() -> bool:
        return path.exists()

    await wait_until(exists, timeout, f"file {path.name}", procs=procs)


async def query(
    app: App, statement: str, params: Sequence[Any] | None = None
) -> list[dict[str, Any]]:
    """Run raw SQL on `app`'s database (autocommit) and return the rows as dicts."""
    async with app.db.connection() as conn:
        cur = await conn.execute(statement.encode(), params)
        return await cur.fetchall() if cur.description else []


async def state_counts(app: App, ids: Sequence[int]) -> dict[str, int]:
    """How many of the jobs `ids` are in each state."""
    rows = await query(
        app,
        "SELECT state::text AS state, count(*) AS n FROM conveyor.jobs"
        " WHERE id = ANY(%s) GROUP BY state",
        [list(ids)],
    )
    return {row["state"]: int(row["n"]) for row in rows}


async def all_in_state(app: App, ids: Sequence[int], state: str) -> bool:
    """True when every job of `ids` is in `state`."""
    return (await state_counts(app, ids)).get(state, 0) == len(ids)


async def rescue_once(app: App, timeout: float = RESCUE_LOCK_TIMEOUT_S) -> RescueReport:
    """One rescue pass from the test process; retried while another rescuer holds the lock."""
    rescuer = Rescuer(app.db, interval=timedelta(seconds=1), dead_after=timedelta(minutes=1))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (report := await rescuer.run_once()).ran:
        if loop.time() > deadline:
            raise AssertionError(f"the rescuer lock stayed taken for {timeout}s")
        await asyncio.sleep(POLL_S)
    return report


async def executions(app: App, job_id: int) -> list[tuple[int, int, str]]:
    """The recorded executions of job `job_id` as (attempt, pid, worker_id), in order."""
    rows = await query(
        app,
        "SELECT attempt, pid, worker_id FROM public.executions WHERE job_id = %s"
        " ORDER BY at, attempt",
        [job_id],
    )
    return [(row["attempt"], row["pid"], row["worker_id"]) for row in rows]


KeyCounts = dict[tuple[str, str], dict[str, int]]
"""Per (queue, concurrency key): waiting, running and the totals."""

KEY_COUNT_FIELDS = (
    "waiting",
    "running",
    "total_enqueued",
    "total_succeeded",
    "total_failed",
    "total_cancelled",
)

_RECOUNT_SQL = """
SELECT queue, concurrency_key AS key,
       count(*) FILTER (WHERE state IN ('scheduled', 'available')) AS waiting,
       count(*) FILTER (WHERE state = 'running') AS running,
       count(*) AS total_enqueued,
       count(*) FILTER (WHERE state = 'succeeded') AS total_succeeded,
       count(*) FILTER (WHERE state = 'failed') AS total_failed,
       count(*) FILTER (WHERE state = 'cancelled') AS total_cancelled
FROM conveyor.jobs
WHERE concurrency_key IS NOT NULL
GROUP BY queue, concurrency_key
"""


def _as_counts(rows: Iterable[dict[str, Any]]) -> KeyCounts:
    return {
        (row["queue"], row["key"]): {name: int(row[name]) for name in KEY_COUNT_FIELDS}
        for row in rows
    }


async def recount(app: App) -> KeyCounts:
    """The per-key counts recomputed from the jobs table (what the triggers must keep)."""
    return _as_counts(await query(app, _RECOUNT_SQL))


async def key_counts(app: App) -> KeyCounts:
    """The per-key counts as `App.keys()` reports them."""
    return _as_counts(asdict(k) for k in await app.keys())


async def snapshot_key_counts(app: App) -> tuple[KeyCounts, KeyCounts]:
    """(concurrency_keys, recount) read by one statement: one snapshot, so the two
    must agree at any instant, even while workers change jobs."""
    rows = await query(
        app,
        "SELECT (SELECT coalesce(jsonb_agg(k), '[]') FROM conveyor.concurrency_keys AS k)"
        f" AS stats, (SELECT coalesce(jsonb_agg(r), '[]') FROM ({_RECOUNT_SQL}) AS r) AS recount",
    )
    return _as_counts(rows[0]["stats"]), _as_counts(rows[0]["recount"])


def counts_differ(stats: KeyCounts, recounted: KeyCounts) -> dict[tuple[str, str], Any]:
    """Keys whose reported counts differ from the recount ({} when they all agree).

    A key row with no job left (made by `set_limit`, or every job deleted) must
    report zero waiting and running; totals of deleted jobs are not recounted."""
    zero = dict.fromkeys(KEY_COUNT_FIELDS, 0)
    return {
        key: (stats.get(key), recounted.get(key))
        for key in stats.keys() | recounted.keys()
        if stats.get(key, zero) != recounted.get(key, zero)
    }
