"""A sample app for `conveyor demo`: a small shop's background work.

Some tasks are slow, some fail and retry, one always fails, some are sync, and
orders go through a four-step pipeline with a cleanup. Workers import it as
`conveyor.demo:app`.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import timedelta

from conveyor.app import App
from conveyor.context import JobContext
from conveyor.outcomes import Fail
from conveyor.retry import ExponentialBackoff
from conveyor.runs import RunFailure

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


# A pipeline: each order is one run. Stock is reserved, then payment and the
# packing slip run in parallel (fan-out), then the parcel ships (fan-in). A
# declined card fails the run; its cleanup releases the reserved stock, once.
fulfil_order = app.pipeline("fulfil_order")


@fulfil_order.step(retry=QUICK_RETRY)
async def reserve_stock(ctx: JobContext) -> dict[str, int]:
    """Reserve the order's items; the reservation is kept in the run state."""
    order = ctx.run.input
    await ctx.run.set("reserved", order["items"])
    return {"order_id": order["order_id"], "items": order["items"]}


@fulfil_order.step(depends_on=["reserve_stock"], max_attempts=3, retry=QUICK_RETRY)
async def take_payment(ctx: JobContext) -> dict[str, int]:
    """Charge the card: some cards are declined for good (the run fails)."""
    order = ctx.run.input
    await asyncio.sleep(random.uniform(0.002, 0.01))
    if order["cents"] % 10 == 7:
        raise Fail(f"card declined for order {order['order_id']}")
    return {"charged": order["cents"]}


@fulfil_order.step(depends_on=["reserve_stock"], retry=QUICK_RETRY)
def print_packing_slip(ctx: JobContext) -> str:
    """A sync step, in parallel with the payment."""
    return f"slip for {ctx.run.prev_results['reserve_stock']['items']} item(s)"


@fulfil_order.step(depends_on=["take_payment", "print_packing_slip"], retry=QUICK_RETRY)
async def ship(ctx: JobContext) -> dict[str, object]:
    """Ship once both are done; sees every earlier result."""
    results = ctx.run.prev_results
    return {"order_id": results["reserve_stock"]["order_id"], "slip": results["print_packing_slip"]}


@fulfil_order.on_failure()
async def release_stock(ctx: JobContext, failure: RunFailure) -> str:
    """Give the reserved stock back (runs once per failed or cancelled run)."""
    reserved = await ctx.run.get("reserved", 0)
    return f"released {reserved} item(s) after {failure.failed_step} failed"
