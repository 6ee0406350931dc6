"""Run one peer scenario against a database you created, and print its dict as JSON.

    createdb -h 127.0.0.1 -U postgres bench_x
    python -m benchmarks.peers procrastinate throughput \
        --database-url postgresql://postgres@127.0.0.1:5432/bench_x --jobs 2000 --concurrency 10
    dropdb -h 127.0.0.1 -U postgres bench_x

Creates no database: the one given must be fresh (empty), since the peer's schema
is installed into it first (`setup`) unless --no-setup. Use a new database per run.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from benchmarks.peers import PEERS, load

from conveyor.event_loop import loop_name
from conveyor.event_loop import run as run_loop

SCENARIOS = ("setup", "enqueue", "throughput", "latency")
DEFAULT_JOBS = {"throughput": 10_000, "latency": 200}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    peer = load(args.name)
    url = args.database_url
    if not args.no_setup or args.scenario == "setup":
        await peer.setup(url)
    result: dict[str, Any]
    if args.scenario == "setup":
        result = {}
    elif args.scenario == "enqueue":
        result = await peer.enqueue(url, single=args.single, bulk=args.bulk)
    elif args.scenario == "throughput":
        jobs = args.jobs or DEFAULT_JOBS["throughput"]
        result = await peer.throughput(url, jobs=jobs, concurrency=args.concurrency)
        result = {"jobs": jobs, "concurrency": args.concurrency, **result}
    else:
        jobs = args.jobs or DEFAULT_JOBS["latency"]
        result = await peer.latency(url, jobs=jobs, rate_per_s=args.rate)
        result = {"jobs": jobs, "rate_per_s": args.rate, **result}
    return {
        "peer": peer.NAME,
        "version": peer.VERSION,
        "scenario": args.scenario,
        "event_loop": loop_name(),
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=PEERS)
    parser.add_argument("scenario", choices=SCENARIOS)
    parser.add_argument("--database-url", required=True, help="a fresh, empty database")
    parser.add_argument("--jobs", type=int, default=0, help="throughput 10000, latency 200")
    parser.add_argument("--concurrency", type=int, default=10, help="throughput only")
    parser.add_argument("--single", type=int, default=1_000, help="enqueue only")
    parser.add_argument("--bulk", type=int, default=100_000, help="enqueue only")
    parser.add_argument("--rate", type=float, default=50.0, help="latency: jobs per second")
    parser.add_argument("--no-setup", action="store_true", help="schema already installed")
    args = parser.parse_args()
    print(json.dumps(run_loop(run(args))))


if __name__ == "__main__":
    main()
