"""Checks of user-given option values: one clear message per mistake, before any work.

Each message names the component, the option and its value, says what is allowed and which config key
fixes it::

    opts = OptionChecker("method 'rap'", prefix="method.kwargs")
    self.num_candidates = opts.integer("num_candidates", num_candidates, low=1)
    self.min_ratio = opts.number("min_ratio", min_ratio, low=0, high=1, low_open=True)
    self.criterion = opts.choice("criterion", criterion, CRITERIA)

    -> method 'rap': min_ratio=0 is not allowed: it must be a number in (0, 1]; set method.kwargs.min_ratio
       to such a value

A value of the wrong type (``"abc"`` for a number, a number for a name) raises
:class:`~pyra_bench.errors.OptionTypeError` (a ``TypeError``); a value of the right type that is out of
range or not among the choices raises :class:`~pyra_bench.errors.ConfigError` (a ``ValueError``). Both are
:class:`~pyra_bench.errors.InputError`. Numbers are never parsed from strings (a quoted ``"0.5"`` in a
config is a mistake worth naming), and an integer option takes a float only when it is whole (``4.0``;
``3.7`` would be silently truncated).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

from .errors import ConfigError, OptionTypeError


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _in_interval(v: float, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (v <= low if low_open else v < low):
        return False
    return not (high is not None and (v >= high if high_open else v > high))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class OptionChecker:
    """Checks the options of one component (``owner``, e.g. ``"method 'rap'"``).

    ``prefix``: the config node the options live under (``"method.kwargs"``), used in the fix hint; a
    single option may name its own key (``key="backbone.lora_rank"``).
    """

    def __init__(self, owner: str, prefix: str | None = None):
        self.owner, self.prefix = owner, prefix

    # -- messages -----------------------------------------------------------------------------------------
    def _fix(self, name: str, rule: str, key: str | None) -> str:
        key = key or (f"{self.prefix}.{name}" if self.prefix else None)
        return f"; set {key} to such a value" if key else ""

    def fail(self, name: str, value: Any, rule: str, key: str | None = None, why: str = "") -> NoReturn:
        """Raise :class:`ConfigError`: ``value`` has the right type but is not allowed (``rule`` says what is)."""
        why = f" ({why})" if why else ""
        raise ConfigError(f"{self.owner}: {name}={value!r} is not allowed{why}: it must be {rule}"
                          + self._fix(name, rule, key))

    def wrong_type(self, name: str, value: Any, rule: str, key: str | None = None) -> NoReturn:
        """Raise :class:`OptionTypeError`: ``value`` is not of the kind ``rule`` describes."""
        raise OptionTypeError(f"{self.owner}: {name} must be {rule}, got {value!r} ({type(value).__name__})"
                              + self._fix(name, rule, key))

    # -- scalars ------------------------------------------------------------------------------------------
    def integer(self, name: str, value: Any, *, low: int | None = None, high: int | None = None,
                none: bool = False, key: str | None = None) -> int | None:
        """An integer (a whole float such as ``4.0`` is accepted) in ``[low, high]``; None if ``none``."""
        rule = " ".join(filter(None, ["an integer", _interval(low, high, False, False)])) + (" or null" if none else "")
        if value is None and none:
            return None
        if _is_number(value) and not _is_int(value) and math.isfinite(value) and float(value).is_integer():
            value = int(value)
        if not _is_int(value):
            self.wrong_type(name, value, rule, key)
        if not _in_interval(value, low, high, False, False):
            self.fail(name, value, rule, key)
        return int(value)

    def number(self, name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, none: bool = False,
               key: str | None = None) -> float | None:
        """A finite real number in the interval (bounds open where asked); None if ``none``."""
        rule = " ".join(filter(None, ["a number", _interval(low, high, low_open, high_open)])) + (
            " or null" if none else "")
        if value is None and none:
            return None
        if not _is_number(value):
            self.wrong_type(name, value, rule, key)
        v = float(value)
        if not math.isfinite(v) or not _in_interval(v, low, high, low_open, high_open):
            self.fail(name, value, rule, key)
        return v

    def boolean(self, name: str, value: Any, *, key: str | None = None) -> bool:
        """true or false (not 0/1, not a string)."""
        if not isinstance(value, bool):
            self.wrong_type(name, value, "true or false", key)
        return value

    def choice(self, name: str, value: Any, choices: Iterable[str], *, key: str | None = None) -> str:
        """One of the strings ``choices``."""
        choices = list(choices)
        rule = f"one of the valid choices: {', '.join(choices)}"
        if not isinstance(value, str):
            self.wrong_type(name, value, rule, key)
        if value not in choices:
            self.fail(name, value, rule, key)
        return value

    # -- lists --------------------------------------------------------------------------------------------
    def _items(self, name: str, value: Any, rule: str, none: bool, key: str | None) -> list | None:
        if value is None and none:
            return None
        # a list, tuple or OmegaConf ListConfig; a string is a sequence too but never a list of numbers
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
            if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
                self.fail(name, list(value), rule, key, why="empty")
            self.wrong_type(name, value, rule, key)
        return list(value)

    def integers(self, name: str, value: Any, *, low: int | None = None, high: int | None = None,
                 none: bool = False, key: str | None = None) -> list[int] | None:
        """A non-empty list of integers in ``[low, high]``; None if ``none``."""
        rule = " ".join(filter(None, ["a non-empty list of integers", _interval(low, high, False, False)])) + (
            " or null" if none else "")
        items = self._items(name, value, rule, none, key)
        if items is None:
            return None
        out = []
        for i, v in enumerate(items):
            if _is_number(v) and not _is_int(v) and math.isfinite(v) and float(v).is_integer():
                v = int(v)
            if not _is_int(v):
                self.wrong_type(f"{name}[{i}]", v, rule, key or (f"{self.prefix}.{name}" if self.prefix else None))
            if not _in_interval(v, low, high, False, False):
                self.fail(name, items, rule, key, why=f"entry {i} is {v!r}")
            out.append(int(v))
        return out

    def numbers(self, name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False, none: bool = False,
                key: str | None = None) -> list[float] | None:
        """A non-empty list of finite numbers in the interval; None if ``none``."""
        rule = " ".join(filter(None, ["a non-empty list of numbers", _interval(low, high, low_open, high_open)])) + (
            " or null" if none else "")
        items = self._items(name, value, rule, none, key)
        if items is None:
            return None
        out = []
        for i, v in enumerate(items):
            if not _is_number(v):
                self.wrong_type(f"{name}[{i}]", v, rule, key or (f"{self.prefix}.{name}" if self.prefix else None))
            if not math.isfinite(float(v)) or not _in_interval(float(v), low, high, low_open, high_open):
                self.fail(name, items, rule, key, why=f"entry {i} is {v!r}")
            out.append(float(v))
        return out
