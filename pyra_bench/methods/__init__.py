"""Method registry. Importing this package registers every built-in method."""

from . import diffrate, peft, pyra, rap, spvit, tome  # noqa: F401  (registration)
from .base import METHODS, BuildContext, Method, Stage

__all__ = ["METHODS", "BuildContext", "Method", "Stage", "get_method"]


def get_method(name: str, **kwargs) -> Method:
    return METHODS.get(name)(**kwargs)


def method_class(name: str, target: str | None = None) -> type[Method]:
    """The Method class for a method config: its registered ``name`` (or, with ``target``, that class)."""
    if target:
        from hydra.utils import get_class

        cls = get_class(target)
        if name not in METHODS:
            METHODS.add(name, cls)
        return cls
    return METHODS.get(name)
