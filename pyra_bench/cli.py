"""What every Hydra entry point does before Hydra starts: refuse an unknown config-group choice
(``method=tomme``, a misspelt ``experiment=``) with one message naming the valid choices, exit status 2,
before Hydra composes anything or makes a folder. Hydra would refuse it too, but with status 1 and after
its own start-up.

The settings themselves are checked once per job where the job's config is: a single run by its Hydra task
(:func:`pyra_bench.train.main`), a sweep's jobs by the sweeper before the first starts
(:class:`pyra_bench.sweep.DedupSweeperMixin`).

``--help`` alone of every Hydra entry point (:func:`hydra_app`) is printed by
:func:`pyra_bench.info.fast_help`, from the help template without Hydra's composition."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .info import _config_names  # a group's choices: its configs
from .paths import CONF_DIR


def hydra_app(config_name: str, config_path: str = str(CONF_DIR)) -> Callable[[Callable], Callable[[], Any]]:
    """``@hydra.main(version_base="1.3", config_path=..., config_name=...)`` whose ``--help`` alone is
    printed by :func:`pyra_bench.info.fast_help` (without Hydra's composition); every other command line goes to Hydra.
    Registers the help resolvers (``${pyra_help:...}``, ``${pyra_prog:...}``) the help templates use."""
    import functools

    import hydra

    from .info import fast_help, register_help_resolver

    register_help_resolver()

    def deco(task: Callable) -> Callable[[], Any]:
        app = hydra.main(version_base="1.3", config_path=config_path, config_name=config_name)(task)

        @functools.wraps(task)
        def main(*args: Any, **kwargs: Any) -> Any:
            if args or kwargs or not fast_help(config_name, conf_dir=Path(config_path)):
                return app(*args, **kwargs)
            return None

        return main

    return deco


def unknown_choices(argv: Sequence[str], groups: Sequence[str], conf_dir: Path = CONF_DIR) -> list[str]:
    """One message per ``group=value`` argument (sweep lists included) whose value has no config."""
    if any(a.startswith(("hydra.searchpath", "--config-dir", "-cd", "--config-path", "-cp")) for a in argv):
        return []  # configs from elsewhere: Hydra knows best
    problems = []
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in groups or value in ("", "null", "none") and key != "experiment":
            continue
        if any(c in value for c in "()[]{}$*"):  # sweep functions, interpolations: left to Hydra
            continue
        choices = _config_names(key, conf_dir)
        if not choices:
            continue
        for v in value.split(","):
            if v and v not in choices:
                close = difflib.get_close_matches(v, choices, n=3)
                problems.append(f"unknown {key} {v!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                                + f"; valid choices: {', '.join(choices)}")
    return problems


def precheck(prog: str, groups: Sequence[str], argv: Sequence[str] | None = None) -> None:
    """Exit with status 2 and one message when ``argv`` names an unknown config-group choice."""
    problems = unknown_choices(sys.argv[1:] if argv is None else argv, groups)
    if problems:
        print(f"{prog}: error: " + "\n  ".join(problems), file=sys.stderr)
        raise SystemExit(2)


#: Whether Hydra has composed the command line and started the task (a run, or a sweep: its sweeper or its first
#: job): a SystemExit(1) before that is Hydra refusing the command line (the entry points report it as bad input).
TASK_STARTED = False


def mark_task_started() -> None:
    """Called where the task starts (``train.main``; :class:`pyra_bench.sweep.SummaryCallback` for a sweep)."""
    global TASK_STARTED
    TASK_STARTED = True
