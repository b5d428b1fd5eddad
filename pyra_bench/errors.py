"""Errors for bad user input, found before any expensive work starts.

Every error a user can fix (an unknown name, a missing folder or file, an infeasible schedule or budget, a
checkpoint that does not fit) derives from :class:`InputError` *and* from the built-in exception it used to be
(``KeyError``, ``FileNotFoundError``, ``ValueError`` ...), so callers can catch either. The command-line entry
points print such an error as one clear message (exit status 2) instead of a traceback; set
``HYDRA_FULL_ERROR=1`` to see the traceback anyway; :func:`prog_name` is the name they print it under.
"""

from __future__ import annotations

import os
import sys


class InputError(Exception):
    """Bad input; the message names the problem and the valid choices or the fix."""


class ConfigError(InputError, ValueError):
    """A configuration value that is not valid (the message lists what is)."""


class InputFileNotFoundError(InputError, FileNotFoundError):
    """A file or folder the run needs does not exist (the message says how to make or point to it)."""


class UnknownOptionError(InputError, TypeError):
    """A keyword option that a method or component does not take."""


class OptionTypeError(InputError, TypeError):
    """An option value of the wrong type (e.g. a string where a number is needed); the message names the
    option, the value and the type it must have."""


class OutputPathError(InputError, OSError):
    """A folder or file the run must write cannot be made there (not a folder, not writable, ...)."""


def prog_name(module: str) -> str:
    """The program as this process was started, for ``--help``, usage lines and error messages: the console
    script's name (``pyra-train``, ``sys.argv[0]`` is the script) or ``python -m <module>`` (``sys.argv[0]``
    is the module's file, or ``-c``)."""
    from pathlib import Path

    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name and not name.endswith(".py") and not name.startswith("-") else f"python -m {module}"


def exit_on_input_error(e: InputError, prog: str = "pyra_bench") -> None:
    """Print ``e`` as a one-paragraph error and exit with status 2 (re-raise under ``HYDRA_FULL_ERROR=1``)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise e
    print(f"{prog}: error: {e}", file=sys.stderr)
    raise SystemExit(2)


class CheckpointFormatError(InputError, ValueError):
    """A checkpoint, stage or record file that is truncated, corrupt or of another format."""


class SettingsMismatchError(ConfigError):
    """A record, finished stage or checkpoint of this run id was made with other settings."""


class ConfigCheckError(ConfigError):
    """Every invalid setting :mod:`pyra_bench.checks` found in one config, one line each (``problems``)."""

    def __init__(self, what: str, problems: list) -> None:
        self.problems = list(problems)
        n = len(self.problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{what}: {n} invalid setting{'' if n == 1 else 's'} (fix {'it' if n == 1 else 'them'} "
                         f"and run again)\n{lines}")


class HubUnreachableError(InputError, ConnectionError):
    """Hub weights were asked for, but the Hugging Face hub cannot be reached and they are not cached."""


class RunError(Exception):
    """A run that cannot go on for a reason its message states in full (training diverged, the disk is full):
    never retried (the same run would fail the same way), recorded as failed, printed as one message (exit
    status 1), the last finished epoch kept on disk."""

    exit_code = 1
    record_failure = True  # written to <results_dir>/failed/<run_id>.json


class TrainingDivergedError(RunError):
    """The training loss became NaN or infinite (the epoch, the last finite loss and the lr are named)."""


class WriteFailedError(RunError, OSError):
    """A file could not be written: the file system is full or read-only, a quota or the file-size limit is
    reached (ENOSPC, EDQUOT, EROFS, EFBIG). The message names the file, its folder and the limit."""

    def __str__(self) -> str:  # the message alone (OSError would add "[Errno N]" and the file name again)
        return str(self.strerror)


class UnsupportedModelError(InputError, TypeError):
    """A backbone the token-reducing patch (or a method) cannot handle; the message says what it needs."""
