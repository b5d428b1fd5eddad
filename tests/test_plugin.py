"""Methods defined outside pyra_bench (tests/plugins/pyra_plugin_demo.py): registered by a config's
``_target_`` or an entry point, with no edit inside the package, and named in the tables by the class."""

from __future__ import annotations

import importlib
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from pyra_bench import paths
from pyra_bench.errors import ConfigError, InputError
from pyra_bench.methods import METHODS, Method, method_class
from pyra_bench.registry import PluginLoadError, UnknownChoiceError

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "tests" / "plugins"
TARGET = "pyra_plugin_demo.MyMethod"


@pytest.fixture
def plugins(monkeypatch):
    """tests/plugins importable; every name a test registers is removed afterwards."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    for name in ("mymethod", "epmethod"):  # left by an in-process sweep of another test in this worker
        METHODS._items.pop(name, None)
    before = set(METHODS._items)
    yield
    for name in set(METHODS._items) - before:
        METHODS._items.pop(name)


@pytest.fixture
def entry_points(tmp_path, monkeypatch, plugins):
    """An installed distribution (a .dist-info on sys.path) declaring pyra_bench.methods entry points."""
    dist = tmp_path / "site" / "pyra_plugin_demo-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pyra-plugin-demo\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[pyra_bench.methods]\nepmethod = pyra_plugin_demo:EntryPointMethod\n"
                                           "broken_plugin = no_such_module_for_test:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_a_target_registers_a_class_from_outside_the_package(plugins):
    assert "mymethod" not in METHODS
    cls = method_class("mymethod", TARGET)
    assert cls.__module__ == "pyra_plugin_demo" and issubclass(cls, Method)
    assert METHODS.get("mymethod") is cls and cls.name == "mymethod" and cls.display_name == "MyMethod"
    assert method_class("mymethod", TARGET) is cls and method_class("mymethod") is cls  # idempotent


@pytest.mark.parametrize("name,target,match", [
    ("tome", TARGET, "already registered as pyra_bench.methods.tome.ToMe"),
    ("x_for_test", "pyra_plugin_demo.ToMeMerge", "is not a subclass of pyra_bench.methods.Method"),
    ("x_for_test", "no_such_module_for_test.Cls", "cannot import 'no_such_module_for_test'.*PYTHONPATH"),
    ("x_for_test", "pyra_plugin_demo.Nope", "module 'pyra_plugin_demo' has no 'Nope'"),
    ("x_for_test", "NoDots", "must be a dotted path module.Class"),
])
def test_a_bad_target_is_a_clear_error(plugins, name, target, match):
    with pytest.raises(ConfigError, match=match):
        method_class(name, target)
    assert "x_for_test" not in METHODS


def test_an_entry_point_is_loaded_when_its_name_is_first_asked_for(entry_points):
    assert "epmethod" not in METHODS and "epmethod" in METHODS.available()
    cls = method_class("epmethod")
    assert cls.__name__ == "EntryPointMethod" and cls.name == "epmethod" and METHODS.get("epmethod") is cls


def test_unknown_and_broken_plugins_are_clear_errors(entry_points):
    with pytest.raises(UnknownChoiceError) as e:
        method_class("no_such_method")
    msg = str(e.value)
    assert isinstance(e.value, InputError)
    assert "unknown method 'no_such_method'; valid choices:" in msg and "epmethod" in msg and "pyra" in msg
    with pytest.raises(PluginLoadError, match=r"broken_plugin = 'no_such_module_for_test:Thing'.*"
                                              r"pyra-plugin-demo.*ModuleNotFoundError"):
        method_class("broken_plugin")


def _resolvers():
    """The config resolvers (${first:...}) live where the run config is turned into objects."""
    for mod in ("pyra_bench.factory", "pyra_bench.train"):
        try:
            return importlib.import_module(mod)
        except ImportError:
            continue


def test_a_plugin_may_declare_its_options_as_the_built_in_methods_do():
    """A plug-in without declared options takes its constructor's (the template above); one that declares
    them (``options = <a MethodOptions class>``) gets them validated, named by its signature and defaults."""
    import inspect

    from pyra_bench.errors import OptionTypeError, UnknownOptionError
    from pyra_bench.methods.options import MethodOptions
    from pyra_bench.schema import opt

    class DeclaredOptions(MethodOptions):
        name = "declared_demo"
        k: int = opt(3, "a count", ge=1)

    class Declared(Method):
        name = "declared_demo"
        options = DeclaredOptions

    assert Declared(k=4).opts.k == 4 and Declared.option_defaults() == {"k": 3}
    assert list(inspect.signature(Declared).parameters) == ["schedule", "k"]
    with pytest.raises(ConfigError, match=r"^method 'declared_demo': k=0 is not allowed: it must be an integer >= 1; "
                                          r"set method.kwargs.k to such a value$"):
        Declared(k=0)
    with pytest.raises(OptionTypeError, match=r"k must be an integer >= 1, got 'x' \(str\)"):
        Declared(k="x")
    with pytest.raises(UnknownOptionError, match="unknown options: j"):
        Declared(j=1)


def test_the_plugin_config_follows_the_sweep_budget(plugins):
    _resolvers()
    with initialize_config_dir(config_dir=str(paths.CONF_DIR), version_base="1.3"):
        def cfg(*o):
            return compose("train", overrides=[f"hydra.searchpath=[file://{PLUGINS / 'conf'}]", "method=mymethod", *o])

        assert cfg("budget=low").compression == "low"  # a Table 2 sweep
        assert cfg().compression == "high"
        assert cfg("budget=low", "compression=r4").compression == "r4"
        c = cfg()
    assert method_class(c.method.name, c.method._target_).display_name == "MyMethod"


def test_the_template_protects_the_class_and_distillation_tokens(plugins):
    from timm.models.deit import VisionTransformerDistilled

    from pyra_bench.models import build_model
    from pyra_bench.models.merging import ToMeMerge

    deit = VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)
    model = build_model(deit, 5, method_class("mymethod", TARGET)(schedule=[2, 2, 0]))
    reducers = [b.token_reducer for b in model.blocks]
    assert isinstance(reducers[0], ToMeMerge) and reducers[2] is None
    assert all(r.num_protected == 2 for r in reducers[:2])
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)


def test_tables_name_the_plugin_by_its_class(plugins, tmp_path):
    """The part of the end-to-end test below that needs no training: a plug-in's records (two seeds)
    become a Table 2 row of their own with mean +- std, named by the class, and a row of the paired table."""
    from pyra_bench import tables
    from pyra_bench.records import write_record

    method_class("mymethod", TARGET)
    for seed in (0, 1):
        for method, acc in (("mymethod", 70.0 + seed), ("tome", 68.0)):
            for task in tables.TASKS:
                write_record(tmp_path / "runs", {
                    "run_id": f"{task}__{method}__{seed}", "status": "completed", "task": task,
                    "backbone": "vit_b16_in21k", "method": method, "method_key": method, "method_options": {},
                    "method_label": method, "schedule": "low", "seed": seed, "metrics": {"test_top1": acc}})
    with initialize_config_dir(config_dir=str(paths.CONF_DIR), version_base="1.3"):
        cfg = compose("tables", overrides=[f"records={tmp_path / 'runs'}", f"out={tmp_path / 'out'}",
                                           "figures=false", "tables=[2]", "paired.n_resamples=500"])
    tables.run(cfg)
    t2 = pd.read_csv(tmp_path / "out" / "table2.csv").set_index("Method")
    assert t2.loc["MyMethod", "Average"] == pytest.approx(70.5) and t2.loc["MyMethod", "Average n"] == 2
    assert t2.loc["MyMethod", "DTD std"] == pytest.approx(0.7071, abs=1e-4)
    assert "70.5 ± 0.7" in (tmp_path / "out" / "table2.md").read_text()
    paired = pd.read_csv(tmp_path / "out" / "paired.csv").set_index("Comparison")
    assert paired.loc["MyMethod − ToMe", "Difference"] == pytest.approx(2.5)
    assert paired.loc["MyMethod − ToMe", "Better on"] == 19


def test_a_plugin_trained_in_a_multirun_gets_a_table2_row_and_a_paired_row(tmp_path, plugins, monkeypatch, capsys):
    """The issue's end-to-end test: a method defined outside pyra_bench, registered through its config (found
    on a config search path outside the package), trained in a multirun -- the command a user types, run by
    the console entry point in this process -- with two seeds beside ToMe on ViT-B/16 at the paper's "low"
    operating point (random weights: ``backbone.weights=none``; one step of batch 2 on a 4-image folder task),
    then a Table 2 row of its own with mean +- std over the 2 seeds, marked as not in the paper, and a row of
    the paired table. The expected numbers are recomputed here from the four records."""
    from helpers.cli import run_entry_point

    from pyra_bench import tables, train
    from pyra_bench.data import write_digits_folder
    from pyra_bench.records import iter_records

    data = tmp_path / "data"
    write_digits_folder(data)
    (data / "digits").rename(data / "dtd")
    for split in ("train800", "val200", "train800val200", "test"):  # keep the steps few
        f = data / "dtd" / f"{split}.txt"
        f.write_text("\n".join(f.read_text().splitlines()[:4]) + "\n")
    work = tmp_path / "work"
    work.mkdir()
    code, out, err = run_entry_point(train.main, "pyra_bench.train", [
        "-m", f"hydra.searchpath=[file://{PLUGINS / 'conf'}]", "task=dtd", f"data_root={data}",
        "backbone=vit_b16_in21k", "backbone.weights=none", "trainer=smoke", "trainer.epochs=1",
        "trainer.warmup_epochs=0", "trainer.max_steps_per_epoch=1", "trainer.batch_size=2",
        "method=mymethod,tome", "budget=low", "seed=0,1", f"results_dir={tmp_path / 'runs'}",
        f"runs_root={tmp_path / 'rundirs'}", f"hydra.sweep.dir={tmp_path / 'multirun'}", "verify_images=false",
        "export_inference_model=false", "logger=csv"], work, monkeypatch, capsys, env={"WANDB_MODE": "disabled"})
    assert code == 0, (out + err)[-3000:]
    records = iter_records([tmp_path / "runs"])
    assert len(records) == 4 and {(r["method"], r["seed"], r["backbone"], r["schedule"]) for r in records} == {
        (m, s, "vit_b16_in21k", "low") for m in ("mymethod", "tome") for s in (0, 1)}
    top1 = {(r["method"], r["seed"]): r["metrics"]["test_top1"] for r in records}
    mine = [top1["mymethod", s] for s in (0, 1)]

    out_dir = tmp_path / "tables"
    with initialize_config_dir(config_dir=str(paths.CONF_DIR), version_base="1.3"):
        cfg = compose("tables", overrides=[f"records={tmp_path / 'runs'}", f"out={out_dir}", "figures=false",
                                           "tables=[2]", "paired.n_resamples=500"])
    tables.run(cfg)
    row = pd.read_csv(out_dir / "table2.csv").set_index("Method").loc["MyMethod"]
    assert row["DTD n"] == 2 and row["Note"] == "not in the paper"
    assert row["DTD"] == pytest.approx(statistics.mean(mine))
    assert row["DTD std"] == pytest.approx(statistics.stdev(mine), nan_ok=True)
    assert f"{statistics.mean(mine):.1f} ± {statistics.stdev(mine):.1f}" in (out_dir / "table2.md").read_text()
    paired = pd.read_csv(out_dir / "paired.csv").set_index("Comparison")
    diff = statistics.mean(top1["mymethod", s] - top1["tome", s] for s in (0, 1))
    assert paired.loc["MyMethod − ToMe", "Difference"] == pytest.approx(diff, abs=0.05)
    assert paired.loc["MyMethod − ToMe", "Over"] == "mean of 1 tasks"
