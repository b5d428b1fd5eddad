"""Method registry. Importing this package registers every built-in method."""

from . import diffrate, peft, pyra, rap, spvit, tome  # noqa: F401  (registration)
from .base import METHODS, BuildContext, Method, Stage

__all__ = ["METHODS", "BuildContext", "Method", "Stage", "get_method"]


def get_method(name: str, **kwargs) -> Method:
    return METHODS.get(name)(**kwargs)
