"""Sweeps under Hydra multirun: failure isolation and a non-zero exit, interpolated run tags, duplicate run
ids launched once, idempotent re-runs, the local GPU launcher, dry-run."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from pyra_bench import sweep, tables
from pyra_bench.launcher import gpu_slots, record_refusal
from pyra_bench.records import iter_records

ROOT = Path(__file__).resolve().parent.parent
TINY = ["task=digits", "backbone=vit_tiny_test", "trainer=smoke", "trainer.epochs=1", "trainer.warmup_epochs=0",
        "export_inference_model=false", "logger=none", "callbacks=none"]


def _sweep(tmp_path, *overrides, monkeypatch=None, capsys=None, flags=()):
    """``python -m pyra_bench.train <flags> -m ...`` in ``tmp_path``: a subprocess, or -- given pytest's
    monkeypatch and capsys -- the console entry point in this process (one interpreter start less)."""
    env = {"PYRA_RESULTS": str(tmp_path / "results"), "PYRA_RUNS": str(tmp_path / "runs"), "WANDB_MODE": "disabled"}
    if monkeypatch is not None:
        from helpers.cli import run_entry_point

        from pyra_bench.train import cli

        code, out, err = run_entry_point(cli, "pyra_bench/train.py", [*flags, "-m", *TINY, *overrides], tmp_path,
                                         monkeypatch, capsys, env=env)
        return code, out + err
    p = subprocess.run([sys.executable, "-m", "pyra_bench.train", *flags, "-m", *TINY, *overrides], cwd=tmp_path,
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def _summary(out):
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("sweep summary:"))
    rest = [ln.split()[:2] for ln in lines[i + 1:] if ln.startswith("  ")]
    return lines[i], {(kind, rid) for kind, rid in rest}


def test_a_sweep_reports_exact_ids_exits_non_zero_on_a_failure_and_launches_a_run_once(tmp_path, monkeypatch, capsys):
    """tome x {low, infeasible r99} and peft (which ignores the budget: one run id for both budgets), with an
    interpolated run_tag: the failure is named under its own id, the sweep exits 1, PEFT trains once."""
    args = ["method=tome,peft", "budget=low,r99", "run_tag=lr${trainer.lr}"]
    code, out = _sweep(tmp_path, *args, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1, out[-3000:]
    head, items = _summary(out)
    assert "2 completed" in head and "1 failed" in head and "1 duplicate" in head, head
    assert ("failed", "digits__vit_tiny_test__tome__r99__seed0__lr0.001") in items, items
    assert ("duplicate", "digits__vit_tiny_test__peft__none__seed0__lr0.001") in items, items
    assert "infeasible merging schedule" in out
    recs = iter_records([tmp_path / "results"])
    assert sorted(r["run_id"] for r in recs) == ["digits__vit_tiny_test__peft__none__seed0__lr0.001",
                                                 "digits__vit_tiny_test__tome__low__seed0__lr0.001"]
    (sweep_dir,) = (tmp_path / "runs" / "multirun").iterdir()
    assert len(json.loads((sweep_dir / "sweep_plan.json").read_text())) == 4
    assert not list((tmp_path / "results" / "failed").glob("*.json")), "bad input writes no failure record"
    # the tables rebuild from exactly those records
    summary = tables.summarise(tables.records_frame(recs))
    assert set(summary["method"]) == {"tome", "peft"}


def test_the_local_launcher_runs_one_job_per_gpu_slot_each_composed_as_the_sweep_composed_it(tmp_path, monkeypatch,
                                                                                              capsys, caplog):
    """GPU slots; and under ``hydra/launcher=local`` each job (a subprocess) sees the sweep's ``--config-dir``
    (its ``local/default.yaml`` sets the run tag) and ``hydra.searchpath`` (a plug-in method): one job completes
    under the tagged id, the infeasible one is failed with its message in the summary."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    assert gpu_slots("auto") == ["0", "3"] and gpu_slots([1, 2], jobs_per_gpu=2) == ["1", "1", "2", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_slots("auto") == [None], "no GPU: one job at a time"
    mine = tmp_path / "mine"
    (mine / "local").mkdir(parents=True)
    (mine / "local" / "default.yaml").write_text("# @package _global_\nrun_tag: mine\n")
    plugins = ROOT / "tests" / "plugins"
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")]))
    caplog.set_level(logging.INFO, logger="pyra_bench")
    code, out = _sweep(tmp_path, "hydra/launcher=local",
                       f"hydra.searchpath=[file://{plugins / 'conf'}]", "method=mymethod", "budget=low,r99",
                       monkeypatch=monkeypatch, capsys=capsys, flags=("--config-dir", str(mine)))
    assert code == 1, out[-3000:]
    head, items = _summary(out)
    assert "1 completed" in head and "1 failed" in head and "1 at a time" in caplog.text, out[-3000:]
    assert ("failed", "digits__vit_tiny_test__mymethod__r99__seed0__mine") in items, items
    assert "infeasible merging schedule" in out.split("sweep summary:")[-1]
    assert [r["run_id"] for r in iter_records([tmp_path / "results"])] == ["digits__vit_tiny_test__mymethod__low__seed0__mine"]
    (sweep_dir,) = (tmp_path / "runs" / "multirun").iterdir()
    assert (sweep_dir / "0" / "job.log").is_file() and (sweep_dir / "0" / "outcome.json").is_file()


def test_a_job_refused_before_its_run_starts_is_failed_with_its_message(tmp_path):
    """A job that exits before writing its outcome (its entry point refused the command line) is failed in the
    summary with the entry point's one message, not "missing"."""
    job = tmp_path / "0"
    job.mkdir()
    (job / "job.log").write_text("some start-up line\npyra_bench.train: error: unknown method 'mymethod'; "
                                 "valid choices: peft, pyra\n")
    (tmp_path / "sweep_plan.json").write_text(json.dumps([{"run_id": "r0", "overrides": [], "job": 0}]))
    record_refusal(job, 2)
    summary = sweep.collect_outcomes(tmp_path)
    assert not summary["missing"] and [f["run_id"] for f in summary["failed"]] == ["r0"]
    assert "exit status 2: pyra_bench.train: error: unknown method 'mymethod'; valid choices" in \
        sweep.format_summary(summary)
    record_refusal(job, 0)  # a job that exited 0 without an outcome is left alone (the summary: missing)


def test_dry_run_lists_runs_duplicates_and_gpu_hours(capsys):
    assert sweep.main(["dry-run", "experiment=table2_vit_b", "task=cifar100,dtd"]) == 0
    out = capsys.readouterr().out
    assert "12 jobs in the sweep (0 duplicate" in out  # 2 tasks x {peft, rap, spvit, diffrate, tome, pyra}
    assert "cifar100__vit_b16_in21k__peft__none__seed0" in out and "GPU hours" in out
    assert sweep.main(["dry-run", "experiment=fig4_deit", "task=dtd"]) == 0
    out = capsys.readouterr().out
    assert out.count("dup ") == 6, "PEFT once, not once per budget"  # 7 budgets x peft -> 1 run


def test_the_sweeper_works_when_pyra_bench_sweep_was_imported_before_hydras_plugin_scan():
    """Hydra's first plugin scan re-executes its core plugin modules; a sweeper class bound to the BasicSweeper
    of an earlier import then fails its own ``super()`` ("obj must be an instance or subtype of type"), as
    every in-process multirun did after a test had imported pyra_bench.sweep. A fresh interpreter (the scan
    happens once per process) imports the module first, scans, and builds the registered sweeper."""
    code = ("import pyra_bench.sweep\n"
            "from hydra.core.plugins import Plugins\n"
            "from hydra.plugins.sweeper import Sweeper\n"
            "cls = Plugins.instance().class_name_to_class['hydra_plugins.pyra_bench_plugins.DedupSweeper']\n"
            "s = cls(max_batch_size=None, params={})\n"
            "assert isinstance(s, Sweeper) and isinstance(s, pyra_bench.sweep.DedupSweeperMixin)\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]
