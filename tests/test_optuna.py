"""conf/hparams_search/optuna.yaml: Hydra's Optuna sweeper over the tuning protocol (train800 -> val200).

Two trials on the offline demo (tiny ViT, trainer=smoke): both finish as tuning runs with their own records
and short run ids, and the sweeper's optimization_results.yaml names the trial with the best val200 top-1
(``optimized_metric=top1_best``: the best evaluated epoch's), checked against the records the runs wrote; the
log holds no colour codes and no alembic plugin lines.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")

ROOT = Path(__file__).resolve().parent.parent


def _search_override() -> str:
    """``hparams_search=optuna`` once conf/train.yaml has the group in its defaults, else appended."""
    from pyra_bench.paths import CONF_DIR

    wired = re.search(r"^\s*-\s*(optional\s+)?hparams_search:", (CONF_DIR / "train.yaml").read_text(), re.M)
    return ("" if wired else "+") + "hparams_search=optuna"


def test_two_optuna_trials_on_the_demo_report_the_best_setting(tmp_path, monkeypatch, capsys, caplog):
    """The command a user types (``python -m pyra_bench.train hparams_search=optuna ...``), run by the console
    entry point in this process."""
    import logging

    from helpers.cli import run_entry_point

    from pyra_bench.train import cli

    sweep = tmp_path / "sweep"
    caplog.set_level(logging.INFO)
    code, out, err = run_entry_point(cli, "pyra_bench/train.py", [
        _search_override(), "trainer=smoke", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
        "optimized_metric=top1_best", f"hydra.sweep.dir={sweep}"], tmp_path, monkeypatch, capsys,
        env={"PYRA_RUNS": str(tmp_path / "runs"), "PYRA_RESULTS": str(tmp_path / "results"), "WANDB_MODE": "disabled"})
    assert code == 0, (out + err)[-4000:]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna" and set(result["best_params"]) == {"trainer.lr", "trainer.weight_decay"}

    records = [json.loads(f.read_text()) for f in sorted((tmp_path / "results").glob("*.json"))]
    assert len(records) == 2  # one run (and record) per trial
    for r in records:  # optuna-<8 hex digits of the searched values>; the values themselves in the config
        lr, wd = r["config"]["trainer"]["lr"], r["config"]["trainer"]["weight_decay"]
        tag = "optuna-" + hashlib.sha1(json.dumps([lr, wd]).encode()).hexdigest()[:8]
        assert r["protocol"] == "tuning" and r["run_id"] == f"digits__vit_demo_mnist__pyra__low__seed0__tune__{tag}"
    assert all(r["metrics"]["test_top1"] is None and r["metrics"]["val_images"] == 200 for r in records)
    settings = {(r["config"]["trainer"]["lr"], r["config"]["trainer"]["weight_decay"]) for r in records}
    assert len(settings) == 2 and all(1e-4 <= lr <= 1e-2 and 1e-5 <= wd <= 1e-2 for lr, wd in settings)
    best = max(r["metrics"]["val_top1_best"] for r in records)  # optimized_metric=top1_best
    assert result["best_value"] == pytest.approx(best)
    winners = [r for r in records if r["metrics"]["val_top1_best"] == pytest.approx(best)]
    assert any(result["best_params"] == {"trainer.lr": r["config"]["trainer"]["lr"],
                                         "trainer.weight_decay": r["config"]["trainer"]["weight_decay"]}
               for r in winners)
    log = out + err + caplog.text
    assert "Best parameters:" in log and "A new study created in memory" in caplog.text  # Optuna's, through logging
    assert "\x1b[" not in log and "setup plugin alembic" not in log
