"""Find the `App` a command line names as `package.module:attribute`."""

from __future__ import annotations

import importlib
import os
import sys

from conveyor.app import App
from conveyor.errors import ConfigError


def load_app(path: str) -> App:
    """Import `module:attribute` and return the App found there; ConfigError otherwise."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"app path {path!r} must look like 'package.module:app'")
    # Like `python -m`, let a module in the current directory be found.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"cannot import module {module_name!r}: {exc}") from exc
    target = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(f"module {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(target, App):
        raise ConfigError(f"{path!r} is a {type(target).__name__}, not a conveyor App")
    return target
