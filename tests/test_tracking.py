"""pyra_bench.tracking: a run's results reach its W&B summary (offline), with group, job type and tags.

The offline run is read back from the file ``wandb sync`` uploads (``run-<id>.wandb``, read by
``tests/helpers/wandb_file.py``), not from the SDK objects the code wrote to. A real training run's summary
is checked in ``tests/test_train.py::test_wandb_logs_offline_one_run_per_pyra_run``.
"""

from __future__ import annotations

import pytest
from helpers.wandb_file import finished_run_file, summary_and_runs
from omegaconf import OmegaConf

from pyra_bench import tracking

wandb = pytest.importorskip("wandb")

# A record as pyra_bench.train writes it (made up: no training here).
RECORD = {
    "run_id": "cifar100__vit_b16_in21k__pyra__high__seed0", "status": "completed", "task": "cifar100",
    "group": "natural", "backbone": "vit_b16_in21k", "method": "pyra", "method_key": "pyra",
    "method_label": "PYRA", "schedule": "high", "seed": 0, "protocol": "final",
    "metrics": {"test_top1": 71.25, "test_top1_best": 72.5, "test_top1_by_epoch": {"10": 60.0, "100": 71.25},
                "test_images": 10000, "val_top1": None},
    "params": {"trainable": 399652, "paper_counted": 304320, "backbone": 85798656, "paper_pct": 0.3547},
    "flops": {"gmacs": 5.07, "counter": "fvcore"},
    "throughput": {"img_per_s": 1365.5, "device": "NVIDIA H100", "batch_size": 512, "dtype": "float32"},
    "training_cost": {"train": {"img_per_s": 512.0, "peak_mem_gib": 9.1, "device": "NVIDIA H100"}},
}

CFG = OmegaConf.create({"protocol": "final", "tags": ["table3"], "logger": {"wandb": {"tags": ["mine", "table3"]}}})


def test_offline_run_summary_holds_the_record(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert tracking.log_record(RECORD) is False  # no active run: nothing to do
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    wandb_logger = WandbLogger(project="pyra_bench_test", save_dir=str(tmp_path), offline=True,
                               **tracking.wandb_kwargs(CFG))
    loggers = [CSVLogger(str(tmp_path / "csv")), wandb_logger]  # as a run holds them
    try:
        assert tracking.log_record(RECORD, loggers[:1]) is False  # no W&B logger among them
        assert tracking.log_record(RECORD, loggers) is True
        run = wandb_logger.experiment
        assert run.summary["top1"] == 71.25  # read back through the W&B service
    finally:
        wandb.finish()
        wandb.teardown()  # stop the W&B service: it writes the run file asynchronously
    summary, runs = summary_and_runs(finished_run_file(tmp_path / "wandb"))
    assert summary["top1"] == 71.25 and summary["top1_best"] == 72.5 and summary["eval_split"] == "test"
    assert summary["params/paper_pct"] == pytest.approx(0.3547)
    assert summary["params/trainable"] == 399652
    assert summary["gmacs"] == pytest.approx(5.07)
    assert summary["throughput/img_per_s"] == pytest.approx(1365.5)
    assert summary["training_cost/train/peak_mem_gib"] == pytest.approx(9.1)
    assert summary["method_label"] == "PYRA"
    assert runs and runs[0].job_type == "train" and list(runs[0].tags) == ["table3", "mine"]


def test_resolvers_for_the_logger_config(monkeypatch):
    tracking.register_resolvers()
    cfg = OmegaConf.create({"protocol": "tuning", "group": "${wandb_group:}", "job_type": "${wandb_job_type:${protocol}}"})
    assert cfg.group is None and cfg.job_type == "tune"
    monkeypatch.setattr(tracking, "_hydra_choice", lambda group: "table2_vit_b" if group == "experiment" else None)
    assert cfg.group == "table2_vit_b"


def test_tuning_runs_report_val200_and_are_tune_jobs():
    rec = {**RECORD, "protocol": "tuning",
           "metrics": {"val_top1": 64.0, "val_top1_best": 65.0, "val_images": 200, "test_top1": None}}
    s = tracking.record_summary(rec)
    assert (s["top1"], s["top1_best"], s["eval_split"], s["eval_images"]) == (64.0, 65.0, "val", 200)
    assert tracking.wandb_job_type({"protocol": "tuning"}) == "tune"
    assert tracking.wandb_job_type(CFG) == "train"
    assert tracking.wandb_job_type(CFG, stage="bench") == "bench"


def test_missing_results_are_left_out_not_zero():
    s = tracking.record_summary({"run_id": "x", "metrics": {"test_top1": None}, "throughput": None, "flops": {}})
    assert s == {"eval_split": "test", "run_id": "x"}


def test_group_is_the_experiment(monkeypatch):
    assert tracking.wandb_group(CFG) is None  # no experiment (and no Hydra app running)
    assert tracking.wandb_group({"experiment_name": "table2_vit_b"}) == "table2_vit_b"
    monkeypatch.setattr(tracking, "_hydra_choice", lambda group: {"experiment": "table3_vit_b"}.get(group))
    assert tracking.wandb_kwargs(CFG) == {"group": "table3_vit_b", "job_type": "train", "tags": ["table3", "mine"]}


def test_experiment_configs_tag_and_group_their_runs():
    """Each experiment config's `tags:` reaches wandb_tags through the composed train config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pyra_bench.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=table2_vit_b", "logger=wandb"])
    assert tracking.wandb_tags(cfg) == ["table2"]


@pytest.mark.parametrize("extra, expected", [([], ["table2"]), (["logger.wandb.tags=[mytag]"], ["table2", "mytag"])])
def test_wandb_tags_on_the_command_line_add_to_the_experiments(tmp_path, extra, expected):
    """``'logger.wandb.tags=[mytag]'`` on ``experiment=table2_vit_b``: the W&B logger that the run builds is
    tagged with both (the override once replaced the experiment's tags); the README's online switch
    (``logger.wandb.offline=false``) is a key of the logger config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from pyra_bench.factory import make_loggers
    from pyra_bench.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=table2_vit_b", "logger=wandb", *extra,
                                          f"run_dir={tmp_path}", "run_id=r", "logger.wandb.offline=false"])
    wb = [lg for lg in make_loggers(cfg) if type(lg).__name__ == "WandbLogger"]
    assert len(wb) == 1
    assert wb[0]._wandb_init["tags"] == expected
    assert wb[0]._offline is False
