"""conf/logger/wandb.yaml builds Lightning's ``WandbLogger`` (:func:`pyra_bench.tracking.wandb_logger`)
without the argument wandb answers in every run of a sweep with ``wandb: WARNING The anonymous setting
has no effect`` (Lightning always passes ``anonymous=None``)."""

from __future__ import annotations

import pytest


def test_the_configured_wandb_logger_starts_its_run_without_the_anonymous_warning(tmp_path, monkeypatch, capfd):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger
    from wandb.errors import term

    from pyra_bench import factory
    from pyra_bench.jobs import compose

    monkeypatch.setenv("WANDB_MODE", "disabled")  # wandb.init's own argument handling, no service, no files
    for name, value in (("_printed_messages", set()), ("_silent", False), ("_show_warnings", True)):
        monkeypatch.setattr(term, name, value)  # wandb prints such a warning once a process, not when silent
    cfg = compose(["logger=wandb", "run_id=r", f"run_dir={tmp_path}", "++logger.wandb.mode=disabled"])
    (logger,) = [lg for lg in factory.make_loggers(cfg) if isinstance(lg, WandbLogger)]
    try:
        assert logger.experiment is not None
    finally:
        wandb.finish()
    assert "anonymous" not in capfd.readouterr().err
    # the reference: Lightning's WandbLogger as such (what the config built before) gets the warning here
    monkeypatch.setattr(term, "_printed_messages", set())
    try:
        assert WandbLogger(project="p", save_dir=str(tmp_path), mode="disabled").experiment is not None
    finally:
        wandb.finish()
    assert "wandb: WARNING The anonymous setting has no effect" in capfd.readouterr().err
