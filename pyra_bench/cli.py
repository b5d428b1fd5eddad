"""What every Hydra entry point does before Hydra starts: refuse an unknown config-group choice
(``method=tomme``, a misspelt ``experiment=``) with one message naming the valid choices, exit status 2,
before Hydra composes anything or makes a folder. Hydra would refuse it too, but with status 1 and after
its own start-up.

The settings themselves are checked once per job where the job's config is: a single run by its Hydra task
(:func:`pyra_bench.train.main`), a sweep's jobs by the sweeper before the first starts
(:class:`pyra_bench.sweep.DedupSweeperMixin`).

``--help`` of every Hydra entry point (:func:`hydra_app`, :func:`fast_help`) is printed from the help
template without Hydra's composition, and names the program as it was started
(:func:`pyra_bench.errors.prog_name`), so
that it takes less time than ``import torch`` (``scripts/bench_cli.py``)."""

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
    printed by :func:`fast_help` (without Hydra's composition); every other command line goes to Hydra.
    Registers the help resolvers (``${pyra_help:...}``, ``${pyra_prog:...}``) the help templates use."""
    import functools

    import hydra

    from .info import register_help_resolver

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


def app_config_groups(conf_dir: Path = CONF_DIR) -> str:
    """Hydra's ``$APP_CONFIG_GROUPS`` of a help template: one ``group: choice, ...`` line per config group
    of ``conf_dir`` (folders holding configs, ``hydra/`` excepted), sorted, each line ending in a newline."""
    conf_dir = Path(conf_dir)
    groups = sorted({p.parent.relative_to(conf_dir).as_posix() for p in conf_dir.rglob("*.yaml")} - {"."})
    return "".join(f"{g}: {', '.join(_config_names(g, conf_dir))}\n" for g in groups
                   if g != "hydra" and not g.startswith("hydra/"))


def fast_help(config_name: str, argv: Sequence[str] | None = None, conf_dir: Path = CONF_DIR) -> bool:
    """Print a Hydra app's ``--help`` as Hydra prints it and return True, when the command line is
    ``--help`` (or ``-h``) alone and the config's ``hydra.help.template`` needs nothing composed: the
    template, its interpolations (``${hydra.help.header}``, ``${pyra_help:...}``) and
    ``$APP_CONFIG_GROUPS`` (:func:`app_config_groups`). Hydra renders the same text, but lists the config
    groups by deep-copying its whole config store about a hundred times (1-2 s, more than the rest of
    ``--help``). Anything else (other arguments; ``$CONFIG``, ``$FLAGS_HELP`` or ``$HYDRA_CONFIG_GROUPS`` in
    the template): False, and Hydra prints the help."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv not in (["--help"], ["-h"]):
        return False
    import string

    from omegaconf import OmegaConf

    from .info import register_help_resolver

    register_help_resolver()  # (also registered by hydra_app; fast_help may be called on its own)
    template = OmegaConf.select(OmegaConf.load(Path(conf_dir) / f"{config_name}.yaml"), "hydra.help.template")
    if not isinstance(template, str):
        return False
    names = {m["named"] or m["braced"] for m in string.Template.pattern.finditer(template)} - {None}
    if names - {"APP_CONFIG_GROUPS"}:
        return False
    print(string.Template(template).substitute(APP_CONFIG_GROUPS=app_config_groups(conf_dir)))
    return True


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
