"""Lazy package exports (PEP 562): ``from pyra_bench.models import build_model`` imports ``models.build``
(and torch) when the name is first asked for, not when the package is imported, so reading a light
module of a package (``pyra_bench.models.backbones``' registry, ``pyra_bench.data.tasks``) for a listing
or ``--help`` does not pay for torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public name ``n`` lives in its sub-module
    ``exports[n]``; each is imported on first use and then kept in the package's namespace."""

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(importlib.import_module(package)), *exports})

    return __getattr__, __dir__
