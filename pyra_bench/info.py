"""``python -m pyra_bench.info [section=]backbones|methods|tasks|experiments|options|peft|recipe|launchers``: the choices.

One line per choice, with its description from where it is defined: a backbone's spec in the registry
(:mod:`pyra_bench.models.backbones`), the first line of a method's docstring (its module's, else its
class's), a task's display name, group and class count (:mod:`pyra_bench.data.tasks`), an experiment
config's first comment line. Only choices with a config in ``conf/<group>/`` can be given on the command
line (``backbone=<name>``); a registered name without one is marked. ``options`` lists each method's
``method.kwargs.*`` options with their defaults and comments (from ``conf/method/<name>.yaml``), ``peft`` the
PEFT choices and their options (``conf/peft/<name>.yaml``),
``recipe`` the paper's training recipe (``conf/trainer/paper.yaml``), ``launchers`` the sweep launchers
(``hydra/launcher=``, ``conf/hydra/launcher/``).

:func:`help_text` gives the same text for ``--help`` (the Hydra resolver ``${pyra_help:<section>}``,
registered by :func:`register_help_resolver`; ``${pyra_help:config,<name>}``: a config's options), and
:func:`fast_help` prints an entry point's ``--help`` from its template without Hydra's composition. A
listing and ``--help`` must be faster than ``import torch`` (``scripts/bench_cli.py``), so nothing here
imports torch or timm: the backbones and tasks come from their registries, which are plain data
(:mod:`pyra_bench.models.backbones`, :mod:`pyra_bench.data.tasks`), and the built-in methods from their
declared options (:mod:`pyra_bench.methods.options`).
"""

from __future__ import annotations

import argparse
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
    from .models.backbones import BACKBONES  # the registry alone (no torch / timm import)

    def describe(name: str) -> str:
        spec = BACKBONES.get(name)
        return spec.description + (f" [timm {spec.timm_name}]" if spec.timm_name else "")

    return _merge("backbone", _config_names("backbone", conf_dir), BACKBONES.names(), describe, conf_dir)


def methods(conf_dir: Path | None = None) -> list[Row]:
    """The built-in methods, described by their declared options (:mod:`pyra_bench.methods.options`, read
    without importing torch), and every method config; a method known only to the registry (a plug-in) is
    listed when it has a config."""
    from .methods.options import BUILT_IN

    return _merge("method", _config_names("method", conf_dir), sorted(BUILT_IN),
                  lambda n: (BUILT_IN[n].__doc__ or "").strip().splitlines()[0], conf_dir)


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
    those directly inside the top-level mapping ``block`` (not those of a mapping nested in it). The comment
    is the line's own, else the comment lines just above the entry (not the comment block that heads the
    file)."""
    rows: list[tuple[str, str, str]] = []
    inside, pending, started, depth = block is None, [], False, None
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
        if m and block is not None:
            depth = len(m["indent"]) if depth is None else depth
        if m and m["value"] and m["key"] != "defaults" and not m["key"].startswith("_") and (
                block is None or len(m["indent"]) == depth):
            rows.append((m["key"], m["value"], m["comment"] or " ".join(pending)))
        pending = []
    return rows


def yaml_blocks(path: Path) -> list[str]:
    """The top-level mappings of a config file (``data:``, ``bench:``), Hydra's ``defaults`` and ``hydra``
    excepted."""
    found = re.findall(r"^([A-Za-z]\w*):\s*(?:#.*)?$", Path(path).read_text(encoding="utf-8"), re.M)
    return [b for b in found if b not in ("defaults", "hydra")]


def method_options(name: str, conf_dir: Path | None = None) -> list[tuple[str, str, str]]:
    """``(key, default, comment)`` of each ``kwargs`` entry of ``conf/method/<name>.yaml`` (its comment, else
    the option's help), then the other declared options of a built-in method
    (:mod:`pyra_bench.methods.options`). A plug-in method: its config's options."""
    from .methods.options import BUILT_IN

    path = Path(conf_dir or CONF_DIR) / "method" / f"{name}.yaml"
    fields = BUILT_IN[name].model_fields if name in BUILT_IN else {}
    rows = [(k, v, c or (fields[k].description if k in fields else ""))
            for k, v, c in (yaml_entries(path, "kwargs") if path.is_file() else [])]
    known = {k for k, _, _ in rows}
    return rows + [(k, _hydra_value(f.default), f.description) for k, f in fields.items() if k not in known]


def _hydra_value(v: object) -> str:
    return {None: "null", True: "true", False: "false"}.get(v, str(v)) if isinstance(v, (bool, type(None))) else str(v)


def options(conf_dir: Path | None = None) -> list[Row]:
    """One line per method option: ``method=<name> method.kwargs.<key>=<default>`` and its comment; then the
    labelled merge variants (``backbone.merge_split`` / ``backbone.merge_site``, the default first)."""
    rows: list[Row] = []
    for name, _ in methods(conf_dir):
        opts = method_options(name, conf_dir)
        if not opts:
            rows.append((f"method={name}", "(no options)"))
        rows += [(f"method={name} method.kwargs.{k}={v}", c) for k, v, c in opts]
    from .models.variants import MERGE_VARIANT_HELP, MERGE_VARIANTS  # (torch-free)

    rows += [(f"backbone.{k}={'|'.join(v)}", MERGE_VARIANT_HELP[k]) for k, v in MERGE_VARIANTS.items()]
    return rows


def peft(conf_dir: Path | None = None) -> list[Row]:
    """The ``peft=`` choices (``conf/peft/*.yaml``), the default (LoRA) first: one line each (its config's first
    comment line), then its options ``peft=<name> peft.<key>=<default>`` with their comments."""
    folder = Path(conf_dir or CONF_DIR) / "peft"
    names = sorted(_config_names("peft", conf_dir), key=lambda n: (n != "lora", n))
    rows: list[Row] = []
    for n in names:
        text = first_comment_line(folder / f"{n}.yaml")
        rows.append((f"peft={n}", text.split(" -- ", 1)[-1] + (" (the default)" if n == "lora" else "")))
        rows += [(f"peft={n} peft.{k}={v}", c) for k, v, c in yaml_entries(folder / f"{n}.yaml") if k != "name"]
    return rows


def recipe(conf_dir: Path | None = None) -> list[Row]:
    """The paper's recipe: the comment heading ``conf/trainer/paper.yaml``, then each value and its comment,
    then LoRA's (``conf/peft/lora.yaml``)."""
    path = Path(conf_dir or CONF_DIR) / "trainer" / "paper.yaml"
    head = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        head.append(line.lstrip("#").strip())
    peft = path.parent.parent / "peft" / "lora.yaml"  # the paper's PEFT (LoRA's dropout is part of the recipe)
    return [("trainer=paper", " ".join(head)), *((f"trainer.{k}={v}", c) for k, v, c in yaml_entries(path)),
            *((f"peft.{k}={v}", c) for k, v, c in yaml_entries(peft) if k != "name")]


def first_sentence(path: Path) -> str:
    """The first sentence of a config file's heading comment (its lines joined up to a blank comment line,
    an indented example line or the first entry)."""
    lines: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#")
        if text.strip().startswith("@"):  # a Hydra directive (# @package ...)
            continue
        if not text.strip() or text.startswith("   "):  # a blank comment line, an indented example
            if lines:
                break
            continue
        lines.append(text.strip())
    head = " ".join(lines)
    return re.split(r"(?<=\.)\s+(?=[A-Z])", head, maxsplit=1)[0]


def launchers(conf_dir: Path | None = None) -> list[Row]:
    """The ``hydra/launcher=`` choices of a sweep: Hydra's default, then ``conf/hydra/launcher/*.yaml``."""
    rows = [("hydra/launcher=basic", "Hydra's default: the sweep's jobs one after another, in this process")]
    folder = Path(conf_dir or CONF_DIR) / "hydra" / "launcher"
    rows += [(f"hydra/launcher={n}", first_sentence(folder / f"{n}.yaml"))
             for n in _config_names("hydra/launcher", conf_dir)]
    return rows


SECTIONS: dict[str, Callable[..., list[Row]]] = {
    "backbones": backbones, "methods": methods, "tasks": tasks, "experiments": experiments,
    "options": options, "peft": peft, "recipe": recipe, "launchers": launchers,
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
              "peft": "PEFT choices (peft=; each composes with every method)",
              "recipe": "The paper's recipe (trainer=paper)", "launchers": "Launchers (hydra/launcher=; with -m)"}
    return "\n".join(f"== {titles[n]} ==\n{format_rows(SECTIONS[n](conf_dir), indent)}" for n in names)


def config_help(name: str, conf_dir: Path | None = None, indent: str = "  ") -> str:
    """The options of ``conf/<name>.yaml``, one line each, ``key=value`` and its comment: the top-level
    ones, then those of each top-level mapping (``bench.device=cpu``, :func:`yaml_blocks`)."""
    path = Path(conf_dir or CONF_DIR) / f"{name}.yaml"
    rows = [(f"{k}={v}", c) for k, v, c in yaml_entries(path)]
    rows += [(f"{b}.{k}={v}", c) for b in yaml_blocks(path) for k, v, c in yaml_entries(path, b)]
    return format_rows(rows, indent)


def _resolve_help(section: str = "all", name: str | None = None) -> str:
    if section == "conf_path":  # where a file of the configs really is (a checkout's conf/, or the install's)
        return str(CONF_DIR / str(name)).replace("$", "$$")
    text = config_help(str(name)) if section == "config" else help_text(str(section))
    return text.replace("$", "$$")  # Hydra fills the help template with string.Template


def register_help_resolver(name: str = "pyra_help") -> None:
    """Register ``${pyra_help:<section>}`` (e.g. in ``hydra.help.template``) -> :func:`help_text`,
    ``${pyra_help:config,<name>}`` -> :func:`config_help` (a config's options with their comments),
    ``${pyra_help:conf_path,<file>}`` -> the path of a file of the configs (checkout or installed), and
    ``${pyra_prog:<module>}`` (``hydra.help.app_name``) -> the program as started
    (:func:`pyra_bench.errors.prog_name`: ``pyra-train`` or ``python -m pyra_bench.train``)."""
    from omegaconf import OmegaConf

    from .errors import prog_name

    OmegaConf.register_new_resolver(name, _resolve_help, replace=True)
    OmegaConf.register_new_resolver("pyra_prog", prog_name, replace=True)


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

    register_help_resolver()  # (also registered by cli.hydra_app; fast_help may be called on its own)
    template = OmegaConf.select(OmegaConf.load(Path(conf_dir) / f"{config_name}.yaml"), "hydra.help.template")
    if not isinstance(template, str):
        return False
    names = {m["named"] or m["braced"] for m in string.Template.pattern.finditer(template)} - {None}
    if names - {"APP_CONFIG_GROUPS"}:
        return False
    print(string.Template(template).substitute(APP_CONFIG_GROUPS=app_config_groups(conf_dir)))
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """``<section>`` or ``section=<section>`` (the ``key=value`` style of the other entry points)."""
    from .errors import prog_name

    ap = argparse.ArgumentParser(prog=prog_name("pyra_bench.info"),
                                 description="List what can be chosen, one line each with a description.")
    ap.add_argument("what", nargs="?", default="all", choices=["all", *SECTIONS], metavar="section",
                    help="all (default) | backbones | methods | tasks | experiments | options (each method's "
                         "options) | peft (the PEFT choices and their options) | recipe (the paper's training recipe) | launchers (hydra/launcher= of a "
                         "sweep); also written section=<name>")
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if sep and key != "section":
            ap.error(f"unknown key {key!r} in {arg!r}; valid keys: section (section=<name>, or the name alone)")
        if sep:
            args[i] = value
    a = ap.parse_args(args)
    if a.what == "all":
        print(help_text("all", indent="  "))
    else:
        print(format_rows(SECTIONS[a.what]()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
