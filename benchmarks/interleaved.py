"""Compare two versions of conveyor in interleaved runs: old, new, new, old, old, new...

    python -m benchmarks.interleaved --old e39dc04 --case plain --concurrency 50 --pairs 3

This machine's speed drifts by a fifth or more within minutes, so two batches
of runs taken one after the other can disagree by more than the change being
measured. Interleaving puts each old run next to a new one.

`--old` is a git revision, checked out into a temporary worktree; `--new` is
a revision too, or (default) this working tree. Each run is a fresh process
importing conveyor from its version's `src/`, on a fresh database of
`CONVEYOR_DATABASE_URL` (required), and runs the `keys` scenario's workload
through one in-process worker with the benchmark's own drain, on the event
loop that version's commands start (uvloop since the fifth session, asyncio
before). It prints jobs/s on the database clock, and the CPU time per job of
the worker process and of all PostgreSQL processes (read from /proc, so
Linux only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CASES = ("plain", "one_key", "hundred_keys")


def _postgres_cpu_s() -> float:
    """CPU seconds used so far by every process named postgres."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            if "(postgres" in text[: text.rindex(")") + 1]:
                fields = text[text.rindex(")") + 2 :].split()
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def _one_run(case: str, jobs: int, concurrency: int) -> dict[str, Any]:
    # Imported here: from the version under test (PYTHONPATH), in the child.
    from conveyor.bench.environment import fresh_database
    from conveyor.bench.sample import NOOP
    from conveyor.bench.scenarios import _drain, _migrated, _span

    with fresh_database(os.environ["CONVEYOR_DATABASE_URL"], label="ab") as url:
        app = await _migrated(url)
        noop = app.tasks[NOOP]
        # The `keys` scenario's three workloads, spelled out here rather than
        # imported: the old version under test may predate any shared helper.
        if case == "plain":
            specs = [noop.job()] * jobs
        elif case == "one_key":
            specs = [noop.configure(concurrency_key="hot", concurrency_limit=10).job()] * jobs
        else:
            specs = [
                noop.configure(concurrency_key=f"k{i % 100}", concurrency_limit=2).job()
                for i in range(jobs)
            ]
        await app.enqueue_many(specs)
        cpu, pg = time.process_time(), _postgres_cpu_s()
        await _drain(app, jobs, concurrency, lambda done, total: None)
        cpu, pg = time.process_time() - cpu, _postgres_cpu_s() - pg
        await app.close()
        done, seconds = await _span(url)
    return {
        "jobs_per_s": round(done / seconds),
        "python_us_per_job": round(cpu / jobs * 1e6),
        "postgres_us_per_job": round(pg / jobs * 1e6),
    }


def _child(args: argparse.Namespace) -> None:
    main = _one_run(args.case, args.jobs, args.concurrency)
    try:
        from conveyor.event_loop import run
    except ImportError:  # a version from before conveyor.event_loop: plain asyncio
        result = asyncio.run(main)
    else:
        result = run(main)
    print(json.dumps(result))


@contextlib.contextmanager
def _checkout(revision: str | None) -> Iterator[Path]:
    """The tree of `revision` (a temporary worktree), or this one for None."""
    if revision is None:
        yield REPO
        return
    with tempfile.TemporaryDirectory(prefix="conveyor-ab-") as parent:
        tree = Path(parent) / "tree"
        git = ["git", "-C", str(REPO)]
        subprocess.run([*git, "worktree", "add", "--detach", "-q", str(tree), revision], check=True)
        try:
            yield tree
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(tree)], check=False)


def _run_in(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", "--case", args.case,
        "--jobs", str(args.jobs), "--concurrency", str(args.concurrency),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run(command, env=env, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"a run in {tree} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.interleaved",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--old", required=False, help="git revision of the old version")
    parser.add_argument("--new", default=None, help="git revision (default: this tree)")
    parser.add_argument("--case", choices=CASES, default="plain")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if not args.old:
        parser.error("--old is required")
    if not os.environ.get("CONVEYOR_DATABASE_URL"):
        parser.error("set CONVEYOR_DATABASE_URL to the server to measure on")
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    with _checkout(args.old) as old_tree, _checkout(args.new) as new_tree:
        for pair in range(1, args.pairs + 1):
            sides = [("old", old_tree), ("new", new_tree)]
            # Alternate which goes first, so that a steady drift (or running
            # second) does not favour one side in every pair.
            for side, tree in sides if pair % 2 else reversed(sides):
                result = _run_in(tree, args)
                runs[side].append(result)
                print(f"pair {pair} {side}: {json.dumps(result)}", flush=True)
    for side in ("old", "new"):
        rates = [r["jobs_per_s"] for r in runs[side]]
        print(f"{side}: jobs/s {rates}, median {statistics.median(rates):,.0f}")


if __name__ == "__main__":
    main()
