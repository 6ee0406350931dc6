"""A sample app for `conveyor demo`: a small shop's background work.

Some tasks are slow, some fail and retry, one always fails, some are sync.
Workers import it as `conveyor.demo:app`.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import timedelta

from conveyor.app import App
from conveyor.context import JobContext
from conveyor.retry import ExponentialBackoff

DEMO_SCHEMA = "conveyor_demo"

# The demo must finish in seconds, so retries come back fast.
QUICK_RETRY = ExponentialBackoff(
    base=timedelta(milliseconds=200), max_delay=timedelta(seconds=1), jitter=0.2
)

app = App(schema=DEMO_SCHEMA)


@app.task(name="resize_image", queue="default", priority=0, retry=QUICK_RETRY)
async def resize_image(ctx: JobContext, image_id: int, width: int) -> dict[str, int]:
    """Pretend to resize an image (async I/O)."""
    await asyncio.sleep(random.uniform(0.005, 0.03))
    return {"image_id": image_id, "width": width}


@app.task(name="send_email", queue="default", priority=5, max_attempts=4, retry=QUICK_RETRY)
async def send_email(ctx: JobContext, to: str) -> str:
    """Send an email through a flaky provider: the first attempt fails 30% of the time."""
    await asyncio.sleep(random.uniform(0.002, 0.01))
    if ctx.attempt == 1 and random.random() < 0.3:
        raise ConnectionError("mail provider timed out")
    return f"sent to {to}"


@app.task(name="charge_card", queue="default", priority=10, retry=QUICK_RETRY)
def charge_card(ctx: JobContext, order_id: int, cents: int) -> dict[str, int]:
    """A sync task (runs in the worker's thread pool)."""
    time.sleep(random.uniform(0.002, 0.01))
    return {"order_id": order_id, "charged": cents}


@app.task(name="sync_inventory", queue="default", max_attempts=3, retry=QUICK_RETRY)
async def sync_inventory(ctx: JobContext, sku: str) -> None:
    """Always fails: shows a job ending `failed` with its error history."""
    raise RuntimeError(f"inventory service rejected {sku}")
