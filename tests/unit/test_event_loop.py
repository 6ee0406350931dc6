"""conveyor.event_loop: which loop conveyor's entry points start, and bad choices."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import warnings

import pytest

from conveyor import ConfigError
from conveyor.event_loop import ENV_EVENT_LOOP, loop_factory, loop_name, run


async def _running() -> str:
    await asyncio.sleep(0)
    return loop_name()


HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
"""uvloop comes with the dev extra wherever it builds (not Windows, not PyPy)."""


@pytest.fixture(autouse=True)
def _no_env_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_EVENT_LOOP, raising=False)


def test_auto_runs_uvloop_where_it_is_installed() -> None:
    expected = "uvloop" if HAS_UVLOOP else "asyncio"
    assert run(_running()) == expected
    assert run(_running(), loop="auto") == expected
    assert loop_name() == expected  # outside a loop: the one run() would start


def test_asyncio_is_the_standard_loop_by_argument_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert loop_factory("asyncio") is None
    assert run(_running(), loop="asyncio") == "asyncio"
    monkeypatch.setenv(ENV_EVENT_LOOP, " AsyncIO ")
    assert run(_running()) == "asyncio"
    assert loop_name() == "asyncio"
    if HAS_UVLOOP:
        assert run(_running(), loop="uvloop") == "uvloop"  # the argument wins


def test_without_uvloop_auto_falls_back_and_an_explicit_ask_is_a_typed_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loop_factory("auto") is None
    assert run(_running()) == "asyncio"
    with pytest.raises(ConfigError, match=r"uvloop was asked for but is not installed: pip"):
        loop_factory("uvloop")


def test_an_unknown_choice_is_refused_and_its_coroutine_closed() -> None:
    coroutine = _running()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would fail here
        with pytest.raises(ConfigError, match=f"--loop or {ENV_EVENT_LOOP}\\) must be one of"):
            run(coroutine, loop="trio")
    assert coroutine.cr_frame is None  # closed, not left pending
