"""pyra_bench.info: one line per backbone / method / task / experiment, each method's options, the recipe."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyra_bench import info
from pyra_bench.errors import ConfigError
from pyra_bench.paths import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent


def test_tasks_in_the_papers_column_order_with_their_titles():
    rows = dict(info.tasks())
    names = list(rows)
    assert names[0] == "cifar100" and names[18] == "smallnorb_ele" and names[19] == "digits"  # then configs only
    assert rows["cifar100"] == "Cifar100 (natural, 100 classes)"  # the paper's Table 2 column title
    assert rows["patch_camelyon"] == "Camelyon (specialized, 2 classes)"
    assert rows["smallnorb_ele"] == "sNORB-Ele (structured, 9 classes)"


def test_methods_backbones_experiments_have_a_description():
    methods = dict(info.methods())
    assert set(methods) == {"peft", "tome", "pyra", "diffrate", "spvit", "rap", "evit"}
    assert methods["pyra"].startswith("PYRA + LoRA") and methods["rap"].startswith("RaP + LoRA")
    backbones = dict(info.backbones())
    assert "ViT-B/16" in backbones["vit_b16_in21k"] and "vit_base_patch16_224.orig_in21k" in backbones["vit_b16_in21k"]
    experiments = dict(info.experiments())
    assert set(experiments) == {p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")}
    assert experiments["table2_vit_b"].startswith("Table 2")
    assert not any(d.startswith("@") for d in experiments.values())  # the "# @package" directive is skipped
    assert all(d for rows in (methods, backbones) for d in rows.values())


def test_config_and_registry_mismatches_are_marked(tmp_path):
    conf = tmp_path / "conf"
    (conf / "backbone").mkdir(parents=True)
    shutil.copy(CONF_DIR / "backbone" / "vit_tiny_test.yaml", conf / "backbone")
    (conf / "backbone" / "my_vit.yaml").write_text("# My own ViT, from a checkpoint of mine\nname: my_vit\n")
    (conf / "backbone" / "bare.yaml").write_text("name: bare\n")
    rows = dict(info.backbones(conf))
    assert rows["my_vit"] == "My own ViT, from a checkpoint of mine (defined by its config)"
    assert rows["bare"] == "(defined by its config: not in the registry)"
    assert rows["vit_b16_in21k"].endswith("(no conf/ file: Python API only)")
    assert "(" not in rows["vit_tiny_test"].split("for tests")[-1]


def test_method_options_come_from_the_config_then_the_signature(tmp_path):
    opts = {k: (v, c) for k, v, c in info.method_options("pyra")}
    assert opts["variant"][0] == "full" and "gated (Table 8)" in opts["variant"][1]  # comment above the key
    assert opts["wr_init"] == ("uniform", "uniform (the authors' code, U(-1,1)) | normal (the paper's text) | zeros")
    conf = tmp_path / "conf"
    (conf / "method").mkdir(parents=True)
    (conf / "method" / "pyra.yaml").write_text("name: pyra\nkwargs:\n  variant: gated  # mine\nlr: null\n")
    opts = {k: (v, c) for k, v, c in info.method_options("pyra", conf)}
    assert opts["variant"] == ("gated", "mine")
    assert opts["ln_eps"] == ("1e-05", "eps of the token-information LayerNorm")  # not in this config: declared
    assert "lr" not in opts  # outside kwargs
    (conf / "method" / "peft.yaml").write_text("name: peft\nkwargs: {}\n")
    lines = dict(info.options(conf))
    assert lines["method=peft"] == "(no options)"  # PEFT takes no options of its own
    assert "method=pyra method.kwargs.variant=gated" in lines


def test_recipe_is_the_paper_trainer_config():
    rows = dict(info.recipe())
    assert "trainer.epochs=100" in rows and "trainer.lr=1.0e-3" in rows and "trainer.batch_size=32" in rows
    assert "AdamW" in rows["trainer=paper"] and "AdamW" not in rows["trainer.epochs=100"]  # the heading once
    assert not any(k.startswith("trainer._") for k in rows)  # no _target_


def test_section_rules_and_private_keys_are_not_options(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("# heading\n_target_: a.B\n# -- recipe ----\nepochs: 3\n# the lr\nlr: 0.1  # inline wins\n"
                    "# above\nwd: 0.0\n")
    assert info.yaml_entries(path) == [("epochs", "3", ""), ("lr", "0.1", "inline wins"), ("wd", "0.0", "above")]


def test_cli(capsys):
    assert info.main(["tasks"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) >= 20 and out[0].split()[0] == "cifar100" and out[19].split()[0] == "digits"
    with pytest.raises(SystemExit) as e:
        info.main(["gpus"])
    assert e.value.code == 2 and "invalid choice: 'gpus'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="valid choices: all, backbones"):
        info.help_text("gpus")


def test_help_resolver_in_a_hydra_help(tmp_path):
    (tmp_path / "app.yaml").write_text("x: 1\nhydra:\n  help:\n    template: |\n      ${pyra_help:experiments}\n")
    script = ("import sys, hydra\nfrom pyra_bench.info import register_help_resolver\nregister_help_resolver()\n"
              f"@hydra.main(version_base='1.3', config_path={str(tmp_path)!r}, config_name='app')\n"
              "def main(cfg): pass\nmain()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "== Experiments (experiment=; sweep with -m) ==" in p.stdout
    assert "\n  table2_vit_b             Table 2 (vit_b): 19 tasks" in p.stdout


def test_methods_are_described_by_their_declared_options(tmp_path):
    """The listing (and --help) reads the built-in methods' declared options (pyra_bench.methods.options,
    without torch): each method's description and every option with its default and help (those the config
    does not set included); a plug-in method without declared options: its config's keys."""
    from pyra_bench.methods.options import BUILT_IN

    rows = dict(info.methods())
    assert set(rows) == set(BUILT_IN)
    for name, options in BUILT_IN.items():
        opts = {k: v for k, v, _ in info.method_options(name)}
        config = {k for k, _, _ in info.yaml_entries(CONF_DIR / "method" / f"{name}.yaml", "kwargs")}
        assert set(opts) == config | set(options.model_fields), name
    assert ("flops_tolerance", "0.01", BUILT_IN["tome"].model_fields["flops_tolerance"].description) \
        in info.method_options("tome")
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "mine.yaml").write_text("# My method, from a plug-in\nname: mine\nkwargs:\n  k: 3\n")
    rows = dict(info.methods(tmp_path))
    assert rows == {"mine": "My method, from a plug-in (defined by its config)",
                    **{n: f"{d} (no conf/ file: Python API only)" for n, d in info.methods()}}
    assert info.method_options("mine", tmp_path) == [("k", "3", "")]


def test_declared_options_are_the_constructors():
    """A method with declared options takes exactly them: its signature, defaults and validation."""
    import inspect

    from pyra_bench.methods import METHODS

    for name in ("tome", "pyra", "rap"):
        cls = METHODS.get(name)
        assert list(inspect.signature(cls).parameters)[1:] == list(cls.options.model_fields), name
        assert cls.option_defaults() == {n: f.default for n, f in cls.options.model_fields.items()}


def test_launchers_are_hydras_default_and_the_launcher_configs():
    rows = dict(info.launchers())
    assert list(rows) == ["hydra/launcher=basic", "hydra/launcher=local", "hydra/launcher=slurm",
                          "hydra/launcher=submitit"]
    assert rows["hydra/launcher=slurm"] == "SLURM through hydra-submitit-launcher: one array job per sweep, one task per run."
    assert rows["hydra/launcher=local"].endswith("one job at a time).")  # the whole first sentence, no example line
    assert "== Launchers (hydra/launcher=; with -m) ==" in info.help_text("launchers")


@pytest.mark.parametrize("section,group", [("backbones", "backbone"), ("methods", "method"), ("tasks", "task"),
                                           ("experiments", "experiment")])
def test_list_module_prints_one_line_per_choice(section, group, monkeypatch, capsys):
    """``python -m pyra_bench.list <section>`` (run as __main__ in this process): one line per choice, each
    a name and a description, every config of the group listed once."""
    import runpy
    import warnings

    monkeypatch.setattr(sys, "argv", ["pyra_bench.list", section])
    sys.modules.pop("pyra_bench.list", None)  # run as __main__ without runpy's "already imported" warning
    with warnings.catch_warnings(), pytest.raises(SystemExit) as e:
        warnings.simplefilter("error", RuntimeWarning)
        runpy.run_module("pyra_bench.list", run_name="__main__")
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines), lines  # a description on every line
    assert len(names) == len(set(names))
    assert {p.stem for p in (CONF_DIR / group).glob("*.yaml")} <= set(names)
    assert names == [n for n, _ in info.SECTIONS[section]()]


#: What a listing or --help must not import (each takes longer to import than the whole listing may).
HEAVY = ("torch", "timm", "lightning", "tensorflow", "tensorflow_datasets")
#: Each listing command as typed -- a console script (``bin/<name>``: its entry point is called, as the
#: script does) or ``python -m <module>`` -- and the first line it must print.
LISTINGS = [
    (["bin/pyra-info"], "pyra_bench.info:main", "== Backbones (backbone=) =="),
    (["-m", "section=backbones"], "pyra_bench.info", "clip_b16 "),
    (["bin/pyra-train", "--help"], "pyra_bench.train:cli", "pyra-train: train and evaluate one run"),
    (["-m", "--help"], "pyra_bench.bench", "python -m pyra_bench.bench: parameters, MACs"),
    (["bin/pyra-prepare-vtab", "--help"], "pyra_bench.data.prepare:main", "pyra-prepare-vtab: build VTAB-1k task folders"),
    (["-m", "--help"], "pyra_bench.tables", "python -m pyra_bench.tables: rebuild the paper's"),
    (["bin/pyra-sweep", "--help"], "pyra_bench.sweep:main", "usage: pyra-sweep [-h]"),
]


def test_listings_and_help_import_neither_torch_nor_timm_and_name_the_program_as_started(tmp_path):
    """``pyra-info``, ``python -m pyra_bench.info section=backbones`` and every entry point's ``--help``, run
    one after another in one fresh interpreter (as ``python -m`` / the console script runs them): each prints
    its text under the name it was started by, and none imports torch, timm, Lightning or TFDS (how long
    they take: scripts/bench_cli.py)."""
    script = f"""
import importlib, json, runpy, sys, warnings
from hydra.core.global_hydra import GlobalHydra
warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported by the one before
for argv, entry, first in {LISTINGS!r}:
    module, _, func = entry.partition(":")
    sys.argv = list(argv)
    print("=== " + entry, flush=True)
    try:
        if func:  # the console script: sys.exit(<entry point>())
            sys.exit(getattr(importlib.import_module(module), func)())
        runpy.run_module(module, run_name="__main__", alter_sys=True)  # python -m <module>
    except SystemExit as e:
        assert e.code in (0, None), (argv, e.code)
    GlobalHydra.instance().clear()
print("=== heavy " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    outputs = p.stdout.split("=== ")[1:]
    assert [o.split("\n", 1)[0] for o in outputs[:-1]] == [e for _, e, _ in LISTINGS]
    for (argv, _, first), out in zip(LISTINGS, outputs):
        assert out.split("\n", 2)[1].startswith(first), (argv, out[:300])
    assert outputs[-1].strip() == "heavy []"
    assert list(tmp_path.iterdir()) == []  # a listing writes nothing


@pytest.mark.parametrize("app,shows", [("train", "method: diffrate, evit, peft, pyra, rap, spvit, tome\n"),
                                       ("bench", "\n  bench.device=cpu ")])
def test_fast_help_prints_what_hydra_prints(app, shows, tmp_path, monkeypatch, capsys):
    """``--help`` alone is rendered from the config's help template without Hydra's composition
    (:func:`pyra_bench.info.fast_help`); Hydra's own rendering of the same template (any other argument
    on the line takes Hydra's path) is the reference."""
    import importlib

    from helpers.cli import run_entry_point

    from pyra_bench.info import fast_help

    monkeypatch.setattr(sys, "argv", [f"pyra_bench/{app}.py", "--help"])
    assert fast_help(app) is True
    fast = capsys.readouterr().out
    entry = importlib.import_module(f"pyra_bench.{app}").cli
    code, hydras, err = run_entry_point(entry, f"pyra_bench/{app}.py", ["--help"], tmp_path, monkeypatch, capsys)
    assert code == 0, err
    assert fast == hydras and shows in fast
    assert fast_help(app, ["--help", "seed=1"]) is False  # an override: Hydra's help (it may change it)
    (tmp_path / "app.yaml").write_text("hydra:\n  help:\n    template: 'x $CONFIG'\n")
    assert fast_help("app", ["--help"], tmp_path) is False  # the composed config: only Hydra has it


def test_prog_name_is_the_console_script_or_python_m(monkeypatch):
    from pyra_bench.errors import prog_name

    for argv0, want in [("/venv/bin/pyra-train", "pyra-train"), ("/src/pyra_bench/train.py", "python -m pyra_bench.train"),
                        ("-c", "python -m pyra_bench.train"), ("", "python -m pyra_bench.train")]:
        monkeypatch.setattr(sys, "argv", [argv0])
        assert prog_name("pyra_bench.train") == want, argv0
