"""``python -m pyra_bench.info backbones|methods|tasks|experiments|options|recipe``: what can be chosen.

One line per choice, with its description from where it is defined: a backbone's spec in the registry
(:mod:`pyra_bench.models.backbones`), the first line of a method's docstring (its class's, else its
module's), a task's display name, group and class count (:mod:`pyra_bench.data.tasks`), an experiment
config's first comment line. Only choices with a config in ``conf/<group>/`` can be given on the command
line (``backbone=<name>``); a registered name without one is marked. ``options`` lists each method's
``method.kwargs.*`` options with their defaults and comments (from ``conf/method/<name>.yaml``),
``recipe`` the paper's training recipe (``conf/trainer/paper.yaml``).

:func:`help_text` gives the same text for ``--help`` (the Hydra resolver ``${pyra_help:<section>}``,
registered by :func:`register_help_resolver`; ``${pyra_help:config,<name>}``: a config's options).
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .paths import CONF_DIR

Row = tuple[str, str]


def _config_names(group: str, conf_dir: Path | None = None) -> list[str]:
    folder = Path(conf_dir or CONF_DIR) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def first_comment_line(path: Path) -> str:
    """The first ``#`` comment of a config file that is not a Hydra directive (``# @package ...``)."""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s:
            continue
        if not s.startswith("#"):
            break
        text = s.lstrip("#").strip()
        if text and not text.startswith("@"):
            return text
    return ""


def first_doc_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def _merge(group: str, configs: list[str], registered: list[str], describe: Callable[[str], str],
           conf_dir: Path | None = None) -> list[Row]:
    """Config names (what the command line accepts) first, then registered names without a config. A
    config that defines its choice itself (not in the registry) is described by its first comment line."""
    def config_only(name: str) -> str:
        text = first_comment_line(Path(conf_dir or CONF_DIR) / group / f"{name}.yaml")
        return f"{text} (defined by its config)" if text else "(defined by its config: not in the registry)"

    rows = [(n, describe(n) if n in registered else config_only(n)) for n in configs]
    rows += [(n, f"{describe(n)} (no conf/ file: Python API only)") for n in registered if n not in configs]
    return rows


def backbones(conf_dir: Path | None = None) -> list[Row]:
    from .models.backbones import BACKBONES

    def describe(name: str) -> str:
        spec = BACKBONES.get(name)
        return spec.description + (f" [timm {spec.timm_name}]" if spec.timm_name else "")

    return _merge("backbone", _config_names("backbone", conf_dir), BACKBONES.names(), describe, conf_dir)


def method_class(name: str) -> type:
    from .methods import METHODS

    return METHODS.get(name)


def method_description(name: str) -> str:
    """The first line of the docstring of the method's module (one method, one file), else of its class."""
    cls = method_class(name)
    text = first_doc_line(sys.modules[cls.__module__]) or first_doc_line(cls)
    label = getattr(cls, "display_name", None)
    return f"{text} [{label}]" if label and label != name and label not in text else text


def methods(conf_dir: Path | None = None) -> list[Row]:
    from .methods import METHODS

    return _merge("method", _config_names("method", conf_dir), METHODS.names(), method_description, conf_dir)


def tasks(conf_dir: Path | None = None) -> list[Row]:
    from .data.tasks import TASKS, task_names

    def describe(name: str) -> str:
        t = TASKS.get(name)
        return f"{t.display} ({t.group}, {t.num_classes} classes)"

    order = task_names()  # the paper's column order, then the demo task
    configs = sorted(_config_names("task", conf_dir), key=lambda n: order.index(n) if n in order else len(order))
    return _merge("task", configs, order, describe, conf_dir)


def experiments(conf_dir: Path | None = None) -> list[Row]:
    folder = Path(conf_dir or CONF_DIR) / "experiment"
    return [(n, first_comment_line(folder / f"{n}.yaml")) for n in _config_names("experiment", conf_dir)]


_ENTRY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_]\w*):\s*(?P<value>[^#]*?)\s*(?:#\s*(?P<comment>.*))?$")


def yaml_entries(path: Path, block: str | None = None) -> list[tuple[str, str, str]]:
    """``(key, value as written, comment)`` of the scalar entries of a config file: the top-level ones, or
    those inside the top-level mapping ``block``. The comment is the line's own, else the comment lines
    just above the entry (not the comment block that heads the file)."""
    rows: list[tuple[str, str, str]] = []
    inside, pending, started = block is None, [], False
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        comment = line.strip().startswith("#")
        top = bool(line) and not line[0].isspace() and not comment
        started = started or (bool(line.strip()) and not comment)
        if block is not None and top:
            if inside:
                break
            inside = re.match(rf"^{block}:\s*(#.*)?$", line) is not None
            continue
        if not inside or (block is None and line.strip() and not top and not comment):
            continue
        if comment:
            text = line.strip().lstrip("#").strip()
            if text.startswith("--"):  # a section rule ("# -- recipe ----"): not an entry's comment
                pending = []
            elif started:
                pending.append(text)
            continue
        m = _ENTRY.match(line)
        if m and m["value"] and m["key"] != "defaults" and not m["key"].startswith("_"):
            rows.append((m["key"], m["value"], m["comment"] or " ".join(pending)))
        pending = []
    return rows


def method_options(name: str, conf_dir: Path | None = None) -> list[tuple[str, str, str]]:
    """``(key, default, comment)`` of each ``kwargs`` entry of ``conf/method/<name>.yaml``, then the
    method's other constructor options (default from the signature, no comment)."""
    path = Path(conf_dir or CONF_DIR) / "method" / f"{name}.yaml"
    rows = yaml_entries(path, "kwargs") if path.is_file() else []
    try:
        sig = inspect.signature(method_class(name).__init__)
    except Exception:  # noqa: BLE001 - an unknown method: the config's options only
        return rows
    known = {k for k, _, _ in rows}
    for p in list(sig.parameters.values())[1:]:
        if p.name in known or p.name == "schedule" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        rows.append((p.name, "" if p.default is p.empty else _hydra_value(p.default), ""))
    return rows


def _hydra_value(v: object) -> str:
    return {None: "null", True: "true", False: "false"}.get(v, str(v)) if isinstance(v, (bool, type(None))) else str(v)


def options(conf_dir: Path | None = None) -> list[Row]:
    """One line per method option: ``method=<name> method.kwargs.<key>=<default>`` and its comment."""
    rows: list[Row] = []
    for name, _ in methods(conf_dir):
        opts = method_options(name, conf_dir)
        if not opts:
            rows.append((f"method={name}", "(no options)"))
        rows += [(f"method={name} method.kwargs.{k}={v}", c) for k, v, c in opts]
    return rows


def recipe(conf_dir: Path | None = None) -> list[Row]:
    """The paper's recipe: the comment heading ``conf/trainer/paper.yaml``, then each value and its comment."""
    path = Path(conf_dir or CONF_DIR) / "trainer" / "paper.yaml"
    head = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        head.append(line.lstrip("#").strip())
    return [("trainer=paper", " ".join(head)), *((f"trainer.{k}={v}", c) for k, v, c in yaml_entries(path))]


SECTIONS: dict[str, Callable[..., list[Row]]] = {
    "backbones": backbones, "methods": methods, "tasks": tasks, "experiments": experiments,
    "options": options, "recipe": recipe,
}


def format_rows(rows: Sequence[Row], indent: str = "") -> str:
    width = max((len(n) for n, _ in rows), default=0)
    return "\n".join(f"{indent}{n:<{width}}  {d}".rstrip() for n, d in rows)


def help_text(section: str = "all", conf_dir: Path | None = None, indent: str = "  ") -> str:
    """The text of one section (or ``all``) for ``--help``: a ``== Title ==`` line and its rows."""
    if section != "all" and section not in SECTIONS:
        from .errors import ConfigError

        raise ConfigError(f"unknown info section {section!r}; valid choices: all, {', '.join(SECTIONS)}")
    names = list(SECTIONS) if section == "all" else [section]
    titles = {"backbones": "Backbones (backbone=)", "methods": "Methods (method=)", "tasks": "Tasks (task=)",
              "experiments": "Experiments (experiment=; sweep with -m)", "options": "Method options",
              "recipe": "The paper's recipe (trainer=paper)"}
    return "\n".join(f"== {titles[n]} ==\n{format_rows(SECTIONS[n](conf_dir), indent)}" for n in names)


def config_help(name: str, conf_dir: Path | None = None, indent: str = "  ") -> str:
    """The top-level options of ``conf/<name>.yaml``, one line each: ``key=value`` and its comment."""
    path = Path(conf_dir or CONF_DIR) / f"{name}.yaml"
    return format_rows([(f"{k}={v}", c) for k, v, c in yaml_entries(path)], indent)


def _resolve_help(section: str = "all", name: str | None = None) -> str:
    text = config_help(str(name)) if section == "config" else help_text(str(section))
    return text.replace("$", "$$")  # Hydra fills the help template with string.Template


def register_help_resolver(name: str = "pyra_help") -> None:
    """Register ``${pyra_help:<section>}`` (e.g. in ``hydra.help.template``) -> :func:`help_text`, and
    ``${pyra_help:config,<name>}`` -> :func:`config_help` (a config's options with their comments)."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver(name, _resolve_help, replace=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyra_bench.info",
                                 description="List what can be chosen, one line each with a description.")
    ap.add_argument("what", nargs="?", default="all", choices=["all", *SECTIONS],
                    help="backbones | methods | tasks | experiments | options (each method's options) | "
                         "recipe (the paper's training recipe); default: all")
    a = ap.parse_args(argv)
    if a.what == "all":
        print(help_text("all", indent="  "))
    else:
        print(format_rows(SECTIONS[a.what]()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
