"""Run a console entry point in this process, as ``python -m <module> <args>`` would from ``cwd``: the
command line is ``sys.argv``, the exit status is the ``SystemExit`` code (0 when it returns). One interpreter
start less than a subprocess (Lightning's import alone takes ~12 s on 2 cores); what needs a process of its
own (signals that end it, SIGKILL, DDP, an installed wheel) stays a subprocess."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def run_entry_point(entry: Callable[[], object], prog: str, args: Sequence[str], cwd: Path, monkeypatch,
                    capsys, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``entry()`` with ``sys.argv = [prog, *args]`` in ``cwd``.

    Hydra is told to leave logging alone (``hydra/job_logging=none``, ``hydra/hydra_logging=none``): its
    ``dictConfig`` closes every handler ever made, and absl's (left on the root logger by an earlier test that
    imported TensorFlow) then closes the stream pytest captures into, breaking every later test. The root
    logger's handlers are put back all the same."""
    import logging

    from hydra.core.global_hydra import GlobalHydra

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [prog, *args, "hydra/job_logging=none", "hydra/hydra_logging=none"])
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    code = 0
    try:
        entry()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        GlobalHydra.instance().clear()
        root.handlers[:] = handlers
        root.setLevel(level)
    out, err = capsys.readouterr()
    return code, out, err
