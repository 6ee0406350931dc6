"""Retry policies: the delay before the next attempt, as pure arithmetic."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest

from conveyor import ConfigError, ExponentialBackoff, FixedDelay, RetryPolicy
from conveyor.retry import DEFAULT_RETRY


def seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def test_exponential_backoff_without_jitter_doubles_from_base() -> None:
    policy = ExponentialBackoff(base=seconds(10), factor=2, max_delay=timedelta(hours=1), jitter=0)
    assert [policy(attempt) for attempt in range(1, 6)] == [
        seconds(10),
        seconds(20),
        seconds(40),
        seconds(80),
        seconds(160),
    ]


def test_exponential_backoff_uses_its_factor() -> None:
    policy = ExponentialBackoff(base=seconds(1), factor=3, jitter=0)
    assert [policy(attempt) for attempt in range(1, 5)] == [
        seconds(1),
        seconds(3),
        seconds(9),
        seconds(27),
    ]


def test_exponential_backoff_with_factor_one_is_constant() -> None:
    policy = ExponentialBackoff(base=seconds(5), factor=1.0, jitter=0)
    assert {policy(attempt) for attempt in range(1, 50)} == {seconds(5)}


def test_exponential_backoff_treats_attempt_zero_or_below_as_the_first() -> None:
    policy = ExponentialBackoff(base=seconds(2), jitter=0)
    assert policy(0) == policy(-5) == policy(1) == seconds(2)


def test_exponential_backoff_is_capped_at_max_delay() -> None:
    policy = ExponentialBackoff(base=seconds(10), factor=2, max_delay=seconds(60), jitter=0)
    assert policy(3) == seconds(40)
    assert policy(4) == seconds(60)
    assert policy(20) == seconds(60)


@pytest.mark.parametrize("attempt", [64, 65, 1_000, 10**6, 2**63])
def test_exponential_backoff_huge_attempt_numbers_do_not_overflow(attempt: int) -> None:
    policy = ExponentialBackoff(base=seconds(1), factor=2, max_delay=timedelta(hours=1), jitter=0)
    assert policy(attempt) == timedelta(hours=1)


def test_exponential_backoff_huge_attempts_with_a_steep_factor_do_not_overflow() -> None:
    policy = ExponentialBackoff(
        base=seconds(1), factor=1_000.0, max_delay=timedelta(days=1), jitter=0
    )
    assert policy(10_000) == timedelta(days=1)


def test_exponential_backoff_jitter_stays_within_its_spread() -> None:
    policy = ExponentialBackoff(
        base=seconds(10), factor=2, max_delay=timedelta(hours=1), jitter=0.25
    )
    for attempt in (1, 2, 3):
        nominal = 10 * 2 ** (attempt - 1)
        delays = [policy(attempt).total_seconds() for _ in range(500)]
        assert all(nominal * 0.75 <= d <= nominal * 1.25 for d in delays)
        # It really spreads: a constant value would defeat its purpose.
        assert len(set(delays)) > 100
        assert min(delays) < nominal < max(delays)


def test_exponential_backoff_full_jitter_never_goes_negative() -> None:
    policy = ExponentialBackoff(base=seconds(1), jitter=1.0)
    assert all(policy(1) >= timedelta(0) for _ in range(1_000))


def test_exponential_backoff_jitter_never_exceeds_max_delay() -> None:
    # `max_delay` is documented as the "upper bound of any single delay".
    policy = ExponentialBackoff(base=seconds(10), factor=2, max_delay=seconds(60), jitter=0.5)
    longest = max(policy(10) for _ in range(500))
    assert longest <= seconds(60)


def test_exponential_backoff_jitter_is_reproducible_with_a_seeded_random() -> None:
    first = ExponentialBackoff(jitter=0.5, _random=random.Random(7))
    second = ExponentialBackoff(jitter=0.5, _random=random.Random(7))
    assert [first(n) for n in range(1, 10)] == [second(n) for n in range(1, 10)]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"base": seconds(-1)}, "base"),
        ({"factor": 0.5}, "factor"),
        ({"base": seconds(10), "max_delay": seconds(5)}, "max_delay"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.5}, "jitter"),
    ],
)
def test_exponential_backoff_rejects_invalid_parameters(
    options: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=rf"ExponentialBackoff\.{field}"):
        ExponentialBackoff(**options)  # type: ignore[arg-type]


def test_fixed_delay_is_the_same_for_every_attempt() -> None:
    policy = FixedDelay(seconds(7))
    assert {policy(attempt) for attempt in (1, 2, 10, 10**9)} == {seconds(7)}


def test_policies_satisfy_the_retry_policy_protocol() -> None:
    assert isinstance(DEFAULT_RETRY, RetryPolicy)
    assert isinstance(FixedDelay(seconds(1)), RetryPolicy)

    def custom(attempt: int) -> timedelta:
        return seconds(attempt)

    assert isinstance(custom, RetryPolicy)
