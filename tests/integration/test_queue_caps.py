"""Queue caps: a key's waiting jobs never pass its max_queue_length; refusals write nothing."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from conveyor import App, ConfigError, JobContext, QueueFull, Task


def _capped(app: App, cap: int = 10) -> Task:
    @app.task(name="capped", concurrency_limit=1, max_queue_length=cap)
    async def capped(ctx: JobContext, i: int) -> None:
        return None

    return capped


async def _job_count(app: App) -> int:
    return sum(n for by_state in (await app.counts()).values() for n in by_state.values())


async def test_enqueue_past_the_cap_raises_queue_full_naming_key_length_and_cap(app: App) -> None:
    capped = _capped(app)
    await app.enqueue_many([capped.job(i=i) for i in range(10)])
    with pytest.raises(QueueFull) as refused:
        await capped.enqueue(i=10)
    assert (refused.value.key, refused.value.queue) == ("capped", "default")
    assert (refused.value.waiting, refused.value.incoming, refused.value.cap) == (10, 1, 10)
    assert "'capped'" in str(refused.value) and "cap of 10" in str(refused.value)
    assert await _job_count(app) == 10
    (key,) = await app.keys()
    assert (key.waiting, key.total_enqueued) == (10, 10)


async def test_bulk_enqueue_is_all_or_nothing_against_the_cap(app: App) -> None:
    capped = _capped(app)
    await app.enqueue_many([capped.job(i=i) for i in range(8)])
    with pytest.raises(QueueFull):
        await app.enqueue_many([capped.job(i=i) for i in range(3)])
    assert await _job_count(app) == 8
    # Exactly up to the cap is fine.
    await app.enqueue_many([capped.job(i=i) for i in range(2)])
    assert await _job_count(app) == 10


async def test_multi_chunk_bulk_past_the_cap_leaves_no_row(app: App, database_url: str) -> None:
    # The cap is passed in the third of three pipelined statements only.
    capped = _capped(app, cap=11_000)
    specs = [capped.job(i=i) for i in range(12_000)]
    with pytest.raises(QueueFull):
        await app.enqueue_many(specs)
    with pytest.raises(QueueFull):
        app.enqueue_many_sync(specs)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        with pytest.raises(QueueFull):
            async with conn.transaction():
                await app.enqueue_many(specs, connection=conn)
    assert await _job_count(app) == 0
    assert [k.waiting for k in await app.keys()] in ([], [0])


async def test_sync_and_transactional_enqueue_are_capped_too(app: App, database_url: str) -> None:
    capped = _capped(app, cap=1)
    capped.enqueue_sync(i=0)
    with pytest.raises(QueueFull):
        capped.enqueue_sync(i=1)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        with pytest.raises(QueueFull):
            async with conn.transaction():
                await capped.configure(connection=conn).enqueue(i=2)
    assert await _job_count(app) == 1


async def test_running_jobs_do_not_count_against_the_cap(app: App) -> None:
    capped = _capped(app, cap=3)
    await app.enqueue_many([capped.job(i=i) for i in range(3)])
    claimed = await app.db.fetch(
        "claim",
        "job_claim_many",
        {"queues": ["default"], "limit": 10, "worker_id": "w", "lease_s": 60.0},
    )
    assert len(claimed) == 1  # limit 1
    await capped.enqueue(i=3)
    with pytest.raises(QueueFull):
        await capped.enqueue(i=4)
    (key,) = await app.keys()
    assert (key.waiting, key.running) == (3, 1)


async def test_concurrent_enqueuers_never_pass_the_cap(app: App, database_url: str) -> None:
    capped = _capped(app, cap=5)
    others = [App(database_url, schema="conveyor") for _ in range(4)]
    for other in others:
        other.tasks = app.tasks

    async def attempt(other: App, i: int) -> bool:
        try:
            await other.enqueue(capped.name, {"i": i})
        except QueueFull:
            return False
        return True

    try:
        accepted = await asyncio.gather(*(attempt(others[i % 4], i) for i in range(40)))
    finally:
        for other in others:
            await other.close()
    assert sum(accepted) == 5
    assert await _job_count(app) == 5
    (key,) = await app.keys()
    assert key.waiting == 5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_queue_length": 5}, "needs a concurrency_limit"),
        ({"max_queue_length": 0, "concurrency_limit": 1}, "max_queue_length"),
        ({"max_queue_length": True, "concurrency_limit": 1}, "max_queue_length"),
    ],
)
def test_bad_cap_options_are_config_errors(app: App, options: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):

        @app.task(name="bad", **options)  # type: ignore[call-overload]
        async def bad(ctx: JobContext) -> None:
            return None


async def test_a_key_created_by_set_limit_still_gets_its_cap_from_the_first_enqueue(
    app: App,
) -> None:
    capped = _capped(app, cap=2)
    await app.set_limit("capped", 1)
    await app.enqueue_many([capped.job(i=i) for i in range(2)])
    with pytest.raises(QueueFull):
        await capped.enqueue(i=2)
    (key,) = await app.keys()
    assert (key.max_queue_length, key.concurrency_limit) == (2, 1)


async def test_a_per_enqueue_limit_on_an_unlimited_task_makes_a_task_key(app: App) -> None:
    @app.task(name="plain")
    async def plain(ctx: JobContext, i: int) -> None:
        return None

    job = await plain.configure(concurrency_limit=1).enqueue(i=1)
    assert job.concurrency_key == "plain"
    (key,) = await app.keys()
    assert key.concurrency_limit == 1
