"""A tiny name -> object registry with errors that list the valid choices (timm / task_adaptation style).

A registry may name an entry-point group (``Registry("method", entry_points="pyra_bench.methods")``): a
name it does not know is then looked up among the installed distributions' entry points of that group
and loaded on first use, so a package outside pyra_bench registers its objects without any edit here::

    # the plug-in's pyproject.toml
    [project.entry-points."pyra_bench.methods"]
    mymethod = "my_methods:MyMethod"
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import metadata
from types import ModuleType
from typing import Generic, TypeVar

from .errors import InputError

T = TypeVar("T")


class UnknownChoiceError(InputError, KeyError):
    """Raised for an unknown name; the message names the kind of thing and every valid choice."""

    def __init__(self, kind: str, name: str, choices: list[str]):
        self.kind, self.name, self.choices = kind, name, sorted(choices)
        super().__init__(f"unknown {kind} {name!r}; valid choices: {', '.join(self.choices)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class PluginLoadError(InputError, ImportError):
    """An entry point (a plug-in) that is installed but cannot be loaded."""


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_points: str | None = None):
        self.kind = kind
        #: entry-point group searched (lazily, on first use) for names that are not registered
        self.entry_points = entry_points
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        if name not in self._items and self.entry_points:
            self._load_entry_point(name)
        try:
            return self._items[name]
        except KeyError:
            raise UnknownChoiceError(self.kind, name, self.available()) from None

    def names(self) -> list[str]:
        """The registered names (entry points not loaded yet are in :meth:`available`)."""
        return sorted(self._items)

    def available(self) -> list[str]:
        """The registered names and the names of the entry points that would load on first use."""
        return sorted(set(self._items) | set(self._entry_point_names()))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    # -- entry points ------------------------------------------------------------------------------------
    def _group(self) -> list[metadata.EntryPoint]:
        return list(metadata.entry_points(group=self.entry_points)) if self.entry_points else []

    def _entry_point_names(self) -> list[str]:
        return [ep.name for ep in self._group()]

    def _load_entry_point(self, name: str) -> None:
        eps = [ep for ep in self._group() if ep.name == name]
        if not eps:
            return
        ep = eps[0]
        dist = getattr(getattr(ep, "dist", None), "name", None)
        where = f"entry point {ep.name} = {ep.value!r} (group {self.entry_points}{f', from {dist}' if dist else ''})"
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - any import failure of a plug-in is the user's to fix
            raise PluginLoadError(f"{self.kind} {name!r}: the {where} could not be loaded: "
                                  f"{type(e).__name__}: {e}") from e
        if name in self._items:  # the module registered itself on import (@REGISTRY.register(name))
            return
        if isinstance(obj, ModuleType):
            raise PluginLoadError(f"{self.kind} {name!r}: the {where} names a module that does not register "
                                  f"{name!r}; point it at the object (module:attribute)")
        self._items[name] = obj
