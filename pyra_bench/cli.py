"""What every Hydra entry point does before Hydra starts: refuse an unknown config-group choice
(``method=tomme``, a misspelt ``experiment=``) with one message naming the valid choices, exit status 2,
before Hydra composes anything or makes a folder. Hydra would refuse it too, but with status 1 and after
its own start-up."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from .paths import CONF_DIR


def group_choices(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    folder = Path(conf_dir) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


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
        choices = group_choices(key, conf_dir)
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
