"""Method registry. The built-in methods are imported (and registered) the first time the registry is used
(:data:`METHODS`, :func:`method_class`, ...); their options are read without them (and without torch) from
:mod:`pyra_bench.methods.options`.

A method defined outside the package is found in one of two ways, with no edit here:

* ``_target_: my_methods.MyMethod`` in its method config (``conf/method/<name>.yaml`` on a config search
  path): :func:`method_class` imports the class and registers it under the config's ``name``;
* an entry point of the group ``pyra_bench.methods`` (``mymethod = "my_methods:MyMethod"`` in the plug-in's
  ``pyproject.toml``): loaded the first time the name is asked for.

A method config read from a *file* (a run record, an exported model, a run folder's config) is data: its
``_target_`` never chooses a module to import. :func:`loaded_method_config` accepts it only when it names the
class already registered under the config's name (a built-in, an installed entry point, or a ``_target_``
from the user's own config, registered when that config was used) and drops it; anything else is refused
(:class:`UntrustedTargetError`) before any import.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    from .base import Method

__all__ = ["ENTRY_POINT_GROUP", "METHODS", "BuildContext", "Method", "Stage", "UntrustedTargetError", "display_name",
           "get_method", "loaded_method_config", "method_class"]

#: The entry-point group searched for methods that are not registered.
ENTRY_POINT_GROUP = "pyra_bench.methods"


def _registry() -> Any:
    """The registry, every built-in method registered (this imports them, and torch)."""
    from . import diffrate, evit, peft, pyra, rap, spvit, tome  # noqa: F401  (registration)
    from .base import METHODS

    return METHODS


def __getattr__(name: str) -> Any:  # PEP 562: the registry and the interface, imported on first use
    if name not in ("METHODS", "BuildContext", "Method", "Stage"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import base

    _registry()
    globals()[name] = getattr(base, name)
    return globals()[name]


def _import_target(target: str, name: str) -> type:
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"method {name!r}: _target_ {target!r} must be a dotted path module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"method {name!r}: cannot import {module_name!r} for _target_ {target!r} ({e}); "
                          f"put the module on PYTHONPATH or install its package") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"method {name!r}: module {module_name!r} has no {attr!r} (_target_ {target!r})") from None


def method_class(name: str, target: str | None = None) -> type[Method]:
    """The method class registered as ``name``; with ``target`` (a config's ``_target_``), that class,
    registered under ``name`` if the name is new.

    Unknown names are looked up among the ``pyra_bench.methods`` entry points; still unknown, an
    :class:`~pyra_bench.registry.UnknownChoiceError` lists every choice.
    """
    from .base import Method

    registry = _registry()
    if not target:
        cls = registry.get(name)
    else:
        cls = _import_target(target, name)
        if name in registry and registry.get(name) is not cls:
            other = registry.get(name)
            raise ConfigError(f"method {name!r} is already registered as {other.__module__}.{other.__qualname__}; "
                              f"_target_ {target!r} is another class. Give the config another name.")
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method {name!r}: {cls!r} is not a subclass of pyra_bench.methods.Method")
    own = vars(cls).get("name")
    if own is not None and own != name:
        raise ConfigError(f"method {name!r}: class {cls.__qualname__} calls itself {own!r}; use one name "
                          f"(the config's `name:` and the class's `name =`)")
    if own is None:  # a plug-in class without a name of its own: the registry's name is its identity
        cls.name = name
    if target and name not in registry:
        registry.add(name, cls)
    return cls


class UntrustedTargetError(ConfigError):
    """A file read as data names a ``_target_`` that is not a registered method class (nothing is imported)."""


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def loaded_method_config(method_cfg: Mapping[str, Any], source: str | os.PathLike) -> dict[str, Any]:
    """The method config of a file (``source``: a record, an exported model's JSON), as data: without its
    ``_target_``, which must name the class registered under the config's ``name`` (see the module docstring);
    :class:`UntrustedTargetError` otherwise, before any module is imported."""
    out = dict(method_cfg)
    target = out.pop("_target_", None)
    if not target:
        return out
    name = str(out.get("name"))
    try:
        cls = _registry().get(name)  # a built-in, one registered by the user's config, or an installed entry point
    except InputError:
        cls = None
    if cls is None or _dotted(cls) != str(target):
        have = f"{name!r} is {_dotted(cls)}" if cls is not None else f"no method {name!r} is registered"
        raise UntrustedTargetError(
            f"{source}: its method config names _target_ {target!r}, but {have}. A loaded file never chooses code "
            f"to import, so nothing was imported. To use that class, install its package (an entry point of group "
            f"{ENTRY_POINT_GROUP}) or name its method config on the command line (e.g. python -m pyra_bench.bench "
            f"hydra.searchpath=[file://<your conf>] method={name} bench.run=...)")
    return out


def display_name(name: str, fallback: str | None = None) -> str:
    """How tables and figures name a method: the class's ``display_name`` where it sets one, else
    ``fallback`` (e.g. a record's ``method_label``), else the registered name."""
    try:
        cls = _registry().get(name)
    except InputError:  # a record of a method that is not installed here
        cls = None
    label = getattr(cls, "display_name", None)
    if isinstance(label, str) and label and label != name:
        return label
    return fallback or name


def get_method(name: str, **kwargs) -> Method:
    return method_class(name)(**kwargs)
