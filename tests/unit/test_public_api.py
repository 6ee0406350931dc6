"""The public API: `conveyor.__all__` is sorted, complete and documented."""

from __future__ import annotations

import importlib
import inspect

import conveyor


def test_all_is_sorted_and_unique() -> None:
    assert conveyor.__all__ == sorted(conveyor.__all__)
    assert len(set(conveyor.__all__)) == len(conveyor.__all__)


def test_every_public_name_is_importable_and_documented() -> None:
    module = importlib.import_module("conveyor")
    for name in conveyor.__all__:
        value = getattr(module, name)
        doc = inspect.getdoc(value)
        assert doc, f"conveyor.{name} has no docstring"


def test_every_public_class_defined_in_conveyor_is_exported() -> None:
    exported = set(conveyor.__all__)
    for name, value in vars(conveyor).items():
        if inspect.isclass(value) and value.__module__.startswith("conveyor."):
            assert name in exported, f"conveyor.{name} is imported but not in __all__"


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from conveyor import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(conveyor.__all__)
