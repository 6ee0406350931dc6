"""Tasks and JobSpec: every bad enqueue input becomes a typed error before any I/O."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor import (
    App,
    Config,
    ConfigError,
    InvalidArguments,
    InvalidJobOptions,
    JobSpec,
    PayloadTooLarge,
    TaskNotFound,
)
from conveyor.tasks import DEFAULT_MAX_ATTEMPTS, PRIORITY_MAX, PRIORITY_MIN

LIMIT = 1_000


def offline_app() -> App:
    """An App that never connects: nothing here reaches a database."""
    return App(config=Config(database_url="postgresql://unit-tests-never-connect.invalid/x"))


def spec(**options: Any) -> JobSpec:
    return JobSpec(task="t", **options)


def test_encode_produces_compact_json_and_defaults() -> None:
    encoded = spec(args={"a": 1, "b": [1, "x"]}, meta={"who": "me"}).encode(LIMIT)
    assert encoded.args == '{"a":1,"b":[1,"x"]}'
    assert encoded.meta == '{"who":"me"}'
    assert encoded.queue == "default"
    assert encoded.max_attempts == DEFAULT_MAX_ATTEMPTS
    assert encoded.delay_s == 0.0
    assert encoded.run_at is None
    assert encoded.timeout_ms is None


def test_encode_converts_delay_and_timeout_units() -> None:
    encoded = spec(delay=timedelta(minutes=2), timeout=timedelta(seconds=1.5)).encode(LIMIT)
    assert encoded.delay_s == 120.0
    assert encoded.timeout_ms == 1_500


@pytest.mark.parametrize(
    "args",
    [
        {"when": datetime(2026, 1, 1, tzinfo=UTC)},
        {"blob": b"bytes"},
        {"items": {1, 2}},
        {"obj": object()},
    ],
)
def test_encode_rejects_non_json_arguments(args: dict[str, Any]) -> None:
    with pytest.raises(InvalidArguments, match="not JSON-serialisable"):
        spec(args=args).encode(LIMIT)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_encode_rejects_nan_and_infinity(value: float) -> None:
    with pytest.raises(InvalidArguments):
        spec(args={"x": value}).encode(LIMIT)


def test_encode_rejects_non_json_meta() -> None:
    with pytest.raises(InvalidArguments, match="meta"):
        spec(meta={"x": object()}).encode(LIMIT)


def test_encode_rejects_arguments_that_are_not_a_mapping() -> None:
    with pytest.raises(InvalidArguments, match="mapping"):
        spec(args=[1, 2]).encode(LIMIT)


def test_encode_rejects_payload_over_the_limit_with_sizes() -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        spec(args={"x": "a" * LIMIT}).encode(LIMIT)
    assert caught.value.limit == LIMIT
    assert caught.value.size > LIMIT


def test_encode_accepts_payload_exactly_at_the_limit() -> None:
    overhead = len('{"x":""}')
    encoded = spec(args={"x": "a" * (LIMIT - overhead)}).encode(LIMIT)
    assert len(encoded.args.encode()) == LIMIT


def test_payload_size_counts_bytes_not_characters() -> None:
    # 400 three-byte characters: 400 characters, over 1,000 bytes.
    with pytest.raises(PayloadTooLarge):
        spec(args={"x": "\u20ac" * 400}).encode(LIMIT)


def test_encode_rejects_negative_delay() -> None:
    with pytest.raises(InvalidJobOptions, match="delay"):
        spec(delay=timedelta(seconds=-1)).encode(LIMIT)


def test_encode_rejects_delay_and_run_at_together() -> None:
    with pytest.raises(InvalidJobOptions, match="delay or run_at"):
        spec(delay=timedelta(seconds=1), run_at=datetime.now(UTC)).encode(LIMIT)


def test_encode_rejects_naive_run_at() -> None:
    with pytest.raises(InvalidJobOptions, match="timezone-aware"):
        spec(run_at=datetime(2026, 1, 1, 9, 0)).encode(LIMIT)


@pytest.mark.parametrize("priority", [PRIORITY_MIN - 1, PRIORITY_MAX + 1, 10_000, 1.5, "1"])
def test_encode_rejects_priority_outside_the_range(priority: object) -> None:
    with pytest.raises(InvalidJobOptions, match="priority"):
        spec(priority=priority).encode(LIMIT)


@pytest.mark.parametrize("priority", [PRIORITY_MIN, 0, PRIORITY_MAX])
def test_encode_accepts_priority_bounds(priority: int) -> None:
    assert spec(priority=priority).encode(LIMIT).priority == priority


@pytest.mark.parametrize("max_attempts", [0, -1, 2.0])
def test_encode_rejects_max_attempts_below_one(max_attempts: object) -> None:
    with pytest.raises(InvalidJobOptions, match="max_attempts"):
        spec(max_attempts=max_attempts).encode(LIMIT)


def test_encode_rejects_empty_queue_and_non_positive_timeout() -> None:
    with pytest.raises(InvalidJobOptions, match="queue"):
        spec(queue="").encode(LIMIT)
    with pytest.raises(InvalidJobOptions, match="timeout"):
        spec(timeout=timedelta(0)).encode(LIMIT)


def test_check_arguments_reports_missing_and_unexpected_arguments() -> None:
    app = offline_app()

    @app.task(name="add")
    def add(ctx: object, a: int, b: int = 0) -> int:
        return a + b

    add.check_arguments({"a": 1})
    add.check_arguments({"a": 1, "b": 2})
    with pytest.raises(InvalidArguments, match=r"'add'.*missing"):
        add.check_arguments({"b": 2})
    with pytest.raises(InvalidArguments, match=r"'add'.*unexpected"):
        add.check_arguments({"a": 1, "c": 3})


def test_task_job_checks_arguments_and_applies_task_defaults() -> None:
    app = offline_app()

    @app.task(name="send", queue="emails", priority=5, max_attempts=2, timeout=3)
    async def send(ctx: object, to: str) -> None: ...

    job = send.job(to="a@example.com")
    assert job.task == "send"
    assert job.queue == "emails"
    assert job.priority == 5
    assert job.max_attempts == 2
    assert job.timeout == timedelta(seconds=3)
    assert job.args == {"to": "a@example.com"}
    with pytest.raises(InvalidArguments):
        send.job(recipient="a@example.com")


def test_configure_overrides_task_defaults_per_enqueue() -> None:
    app = offline_app()

    @app.task(name="send", queue="emails")
    async def send(ctx: object, to: str) -> None: ...

    job = send.configure(queue="urgent", priority=9, meta={"k": "v"}).job(to="x")
    assert (job.queue, job.priority, job.meta) == ("urgent", 9, {"k": "v"})


def test_configure_rejects_unknown_options() -> None:
    app = offline_app()

    @app.task(name="send")
    async def send(ctx: object, to: str) -> None: ...

    with pytest.raises(InvalidJobOptions, match="unknown enqueue option"):
        send.configure(dealy=timedelta(seconds=1))


@pytest.mark.parametrize(
    "func",
    [
        lambda: None,
        lambda *, a: None,
        lambda *args: None,
        lambda **kwargs: None,
    ],
    ids=["no-parameters", "keyword-only", "var-positional", "var-keyword"],
)
def test_task_without_a_context_parameter_is_a_config_error(func: Any) -> None:
    app = offline_app()
    with pytest.raises(ConfigError, match="job context"):
        app.task(name="bad")(func)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"priority": 101}, "priority"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"queue": ""}, "queue"),
        ({"timeout": -1}, "timeout"),
    ],
)
def test_bad_task_options_are_config_errors(options: dict[str, Any], needle: str) -> None:
    app = offline_app()
    with pytest.raises(ConfigError, match=needle):
        app.task(name="bad", **options)(lambda ctx: None)


def test_task_names_default_to_module_and_qualified_name() -> None:
    app = offline_app()

    @app.task
    def plain(ctx: object) -> None: ...

    assert (
        plain.name
        == f"{__name__}.test_task_names_default_to_module_and_qualified_name.<locals>.plain"
    )
    assert app.get_task(plain.name) is plain


def test_get_task_of_unknown_name_lists_the_known_ones() -> None:
    app = offline_app()

    @app.task(name="known")
    def known(ctx: object) -> None: ...

    with pytest.raises(TaskNotFound, match=r"unknown task 'missing'.*known") as caught:
        app.get_task("missing")
    assert caught.value.name == "missing"


def test_task_detects_sync_and_async_functions_and_stays_callable() -> None:
    app = offline_app()

    @app.task(name="sync")
    def sync(ctx: object, x: int) -> int:
        return x * 2

    @app.task(name="async")
    async def asynchronous(ctx: object) -> None: ...

    assert not sync.is_async
    assert asynchronous.is_async
    assert sync(None, x=4) == 8
