"""Sweeps under Hydra multirun: basic and submitit-local launchers, idempotence, failure isolation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyra_bench import sweep, tables
from pyra_bench.records import iter_records

ROOT = Path(__file__).resolve().parent.parent
TINY = ["task=digits", "backbone=vit_tiny_test", "trainer=smoke", "export_inference_model=false"]


def _sweep(tmp_path, *overrides):
    env = {**os.environ, "PYRA_RESULTS": str(tmp_path / "results"), "PYRA_RUNS": str(tmp_path / "runs"),
           "WANDB_MODE": "disabled"}
    p = subprocess.run([sys.executable, "-m", "pyra_bench.train", "-m", *TINY, *overrides], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout + p.stderr


def _summary_line(out):
    return next(line for line in out.splitlines() if line.startswith("sweep summary:"))


def test_sweep_is_idempotent_and_isolates_failures(tmp_path, monkeypatch, capsys):
    out = _sweep(tmp_path, "method=tome,pyra", "seed=0,1")
    assert "4 succeeded, 0 skipped, 0 failed, 0 missing" in _summary_line(out)
    recs = iter_records([tmp_path / "results"])
    assert sorted((r["method"], r["seed"]) for r in recs) == [("pyra", 0), ("pyra", 1), ("tome", 0), ("tome", 1)]
    # the tables rebuild from exactly those records
    summary = tables.summarise(tables.records_frame(recs))
    assert set(summary["method"]) == {"tome", "pyra"} and (summary["n_runs"] == 2).all()
    assert tables.main(["--records", str(tmp_path / "results"), "--out", str(tmp_path / "tables"), "--tables", "3"]) == 0
    # re-running skips everything; deleting one record re-runs only that one
    assert "0 succeeded, 4 skipped" in _summary_line(_sweep(tmp_path, "method=tome,pyra", "seed=0,1"))
    victim = next((tmp_path / "results").glob("digits__vit_tiny_test__pyra*seed1.json"))
    victim.unlink()
    assert "1 succeeded, 3 skipped" in _summary_line(_sweep(tmp_path, "method=tome,pyra", "seed=0,1"))
    assert victim.exists()
    # the same runs with another learning rate are not taken from the old records: dry-run warns, the sweep
    # reports them as failed with the reason, and run_tag keeps them apart
    monkeypatch.setenv("PYRA_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("PYRA_RUNS", str(tmp_path / "runs"))
    assert sweep.main(["dry-run", *TINY, "method=tome,pyra", "seed=0", "trainer.lr=0.01"]) == 0
    assert "2 would STOP" in capsys.readouterr().out
    line = _summary_line(_sweep(tmp_path, "method=tome,pyra", "seed=0", "trainer.lr=0.01"))
    assert "0 succeeded, 0 skipped, 2 failed" in line, line
    line = _summary_line(_sweep(tmp_path, "method=tome", "seed=0", "trainer.lr=0.01", "run_tag=lr0.01"))
    assert "1 succeeded, 0 skipped, 0 failed" in line, line
    # a failing run (infeasible schedule) does not stop the sweep and is reported
    out = _sweep(tmp_path, "method=tome,pyra", "seed=2", "budget=low,[99]")
    line = _summary_line(out)
    assert "2 succeeded" in line and "2 failed" in line, out[-2000:]
    assert "infeasible merging schedule" in out
    failed = list((tmp_path / "results" / "failed").glob("*seed2.json"))
    assert len(failed) == 2 and json.loads(failed[0].read_text())["status"] == "failed"


def test_sweep_under_submitit_local_executor(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = _sweep(tmp_path, "hydra/launcher=local", "method=tome,pyra")
    assert "2 succeeded" in _summary_line(out)
    assert len(iter_records([tmp_path / "results"])) == 2


def test_dry_run_lists_runs_and_gpu_hours(capsys):
    from pyra_bench.sweep import main

    assert main(["dry-run", "experiment=table2_vit_b"]) == 0
    out = capsys.readouterr().out
    assert "114 runs in the sweep" in out  # 19 tasks x {peft, rap, spvit, diffrate, tome, pyra}
    assert "cifar100__vit_b16_in21k__peft__none__seed0" in out and "GPU hours" in out
