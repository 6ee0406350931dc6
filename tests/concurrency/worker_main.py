"""A worker process for the concurrency tests (independent of the `conveyor` CLI).

    CONVEYOR_DATABASE_URL=... python -m tests.concurrency.worker_main \
        --ready-file R --stopping-file S --stats-file T [--concurrency N ...]

It writes the ready file once its listener is connected and its first claim
is done, the stopping file when SIGTERM/SIGINT arrives, and the stats file
(JSON) after a clean shutdown. The exit status is 0 after a graceful stop.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

from conveyor import Worker, WorkerConfig
from conveyor.event_loop import run as run_loop
from tests.concurrency.sample_app import build_app

READY_TIMEOUT_S = 30.0
READY_POLL_S = 0.01


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--stopping-file", type=Path, required=True)
    parser.add_argument("--stats-file", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=5)
    parser.add_argument("--poll-interval", type=float, default=0.2)
    parser.add_argument("--shutdown-grace", type=float, default=10.0)
    parser.add_argument("--lease-duration", type=float, default=30.0)
    parser.add_argument("--heartbeat-interval", type=float, default=5.0)
    parser.add_argument("--rescue-interval", type=float, default=5.0)
    parser.add_argument(
        "--no-rescuer", dest="run_rescuer", action="store_false", help="do not rescue leases"
    )
    parser.add_argument(
        "--queues", default=None, help="comma-separated queues to claim from (default: default)"
    )
    parser.add_argument(
        "--pool-size", type=int, default=None, help="the App's pool size (default: Config's)"
    )
    parser.add_argument(
        "--pooled",
        action="store_true",
        help="the URL leads through a transaction-mode pooler: no LISTEN, no prepared statements",
    )
    return parser.parse_args(argv)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def _ready(worker: Worker) -> None:
    """Wait until NOTIFY can wake this worker and its first claim has run."""
    async with asyncio.timeout(READY_TIMEOUT_S):
        await worker.connected.wait()
        while worker.claims < 1:
            await asyncio.sleep(READY_POLL_S)


async def _serve(args: argparse.Namespace) -> None:
    app = build_app(
        os.environ["CONVEYOR_DATABASE_URL"], pool_size=args.pool_size, pooled=args.pooled
    )
    config = WorkerConfig(
        concurrency=args.concurrency,
        poll_interval=timedelta(seconds=args.poll_interval),
        shutdown_grace=timedelta(seconds=args.shutdown_grace),
        lease_duration=timedelta(seconds=args.lease_duration),
        heartbeat_interval=timedelta(seconds=args.heartbeat_interval),
        rescue_interval=timedelta(seconds=args.rescue_interval),
        run_rescuer=args.run_rescuer,
        listen=not args.pooled,
    )
    if args.queues is not None:
        config = dataclasses.replace(config, queues=tuple(args.queues.split(",")))
    worker = Worker(app, config)

    def on_signal(signum: int) -> None:
        _write_atomically(args.stopping_file, str(signum))
        worker.request_stop()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await worker.start()
        await _ready(worker)
        _write_atomically(args.ready_file, json.dumps({"pid": os.getpid(), "id": worker.id}))
        await worker.run()
    finally:
        await worker.stop()
        await app.close()
    stats = {"worker_id": worker.id, **dataclasses.asdict(worker.stats)}
    _write_atomically(args.stats_file, json.dumps(stats))


def main(argv: list[str] | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT; 0 after a graceful stop."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    run_loop(_serve(_parse(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
