"""Echoes: a worker's own notifications are recognised once each, and never for long."""

from __future__ import annotations

from conveyor.worker.echoes import Echoes


def test_an_expected_notification_is_heard_once_as_an_echo() -> None:
    echoes = Echoes(ttl_s=2.0)
    echoes.expect(7, ["default"], now=0.0)
    echoes.settle(7, ["default"], ["default"])
    assert echoes.heard(7, "default", now=0.1)
    assert not echoes.heard(7, "default", now=0.2)  # the next one is news
    assert len(echoes) == 0


def test_another_backend_or_queue_is_news() -> None:
    echoes = Echoes()
    echoes.expect(7, ["default"], now=0.0)
    assert not echoes.heard(8, "default", now=0.1)
    assert not echoes.heard(7, "other", now=0.1)
    assert echoes.heard(7, "default", now=0.1)


def test_an_echo_heard_before_the_write_returns_is_still_recognised() -> None:
    echoes = Echoes()
    echoes.expect(7, ["default", "other"], now=0.0)
    assert echoes.heard(7, "default", now=0.01)
    echoes.settle(7, ["default", "other"], ["default"])
    assert len(echoes) == 0


def test_queues_the_write_did_not_notify_are_forgotten() -> None:
    echoes = Echoes()
    echoes.expect(7, ["default", "other"], now=0.0)
    echoes.settle(7, ["default", "other"], [])
    assert len(echoes) == 0
    assert not echoes.heard(7, "default", now=0.1)


def test_two_writes_on_one_backend_expect_two_echoes() -> None:
    echoes = Echoes()
    for now in (0.0, 0.1):
        echoes.expect(7, ["default"], now=now)
        echoes.settle(7, ["default"], ["default"])
    assert echoes.heard(7, "default", now=0.2)
    assert echoes.heard(7, "default", now=0.2)
    assert not echoes.heard(7, "default", now=0.2)


def test_an_echo_never_heard_expires_and_cannot_swallow_later_news() -> None:
    echoes = Echoes(ttl_s=2.0)
    echoes.expect(7, ["default"], now=0.0)
    echoes.settle(7, ["default"], ["default"])
    assert not echoes.heard(7, "default", now=2.5)
    assert len(echoes) == 0


def test_forget_drops_every_expectation() -> None:
    echoes = Echoes()
    echoes.expect(7, ["default"], now=0.0)
    echoes.expect(8, ["default"], now=0.0)
    echoes.forget()
    assert len(echoes) == 0
    assert not echoes.heard(7, "default", now=0.1)
