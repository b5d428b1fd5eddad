"""File-permission helpers shared by the tests of files made with the user's umask."""

from __future__ import annotations

import os
import stat


def file_mode(path: str | os.PathLike) -> int:
    """The permission bits of ``path`` (e.g. 0o644)."""
    return stat.S_IMODE(os.stat(path).st_mode)
