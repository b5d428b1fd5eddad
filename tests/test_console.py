"""pyra_bench.console: each Lightning line once, no adverts, no unactionable warnings, one line per epoch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from pyra_bench import console

ROOT = Path(__file__).resolve().parent.parent

class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def training_step(self, batch, i):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.lin(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, i):
        x, y = batch
        self.log("test/top1", (self.lin(x).argmax(1) == y).float().mean() * 100)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.25)


def _fit(save_dir: Path, fixed: bool):
    """2 epochs of 3 batches; ``fixed``: with the console helpers, as train wires them."""
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.randn(24, 4), torch.randint(0, 2, (24,)))
    dm = L.LightningDataModule.from_datasets(train_dataset=ds, val_dataset=ds, batch_size=8)  # 3 batches
    cbs = [console.FitLogInterval(), console.EpochLogger(enabled=True)] if fixed else []
    trainer = L.Trainer(max_epochs=2, logger=CSVLogger(str(save_dir)), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu", callbacks=cbs)
    trainer.fit(_Tiny(), datamodule=dm)
    return trainer


@pytest.fixture(scope="module")
def fit_outputs(tmp_path_factory):
    """stderr and warnings of a fit before and after ``setup_logging``, with logging configured as Hydra's
    default job_logging does (a root handler) and Lightning's import-time handler really there (its
    ``lightning/__init__.py`` re-run: it adds a stream handler to the ``lightning`` logger)."""
    import importlib

    import lightning

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = []
    try:
        for fixed in (False, True):
            stream = io.StringIO()
            handler = logging.StreamHandler(stream)
            handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))
            root.handlers, root.level = [handler], logging.INFO
            with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stream):
                warnings.simplefilter("always")
                if fixed:
                    console.setup_logging()
                else:
                    importlib.reload(lightning)  # its handler now writes to the redirected stderr
                trainer = _fit(tmp_path_factory.mktemp("fit"), fixed)
            out.append((stream.getvalue(), [str(w.message) for w in caught], trainer.log_every_n_steps))
    finally:
        root.handlers, root.level = saved
        console.setup_logging()  # leave no Lightning handler behind for the other tests
    return out


def test_lightning_status_lines_appear_once_without_adverts(fit_outputs):
    (raw, _, _), (fixed, _, _) = fit_outputs
    status = "GPU available:"
    # the problem is real: without setup_logging Lightning's own handler and the root's both print it
    assert raw.count(status) == 2 and "💡 Tip" in raw
    assert fixed.count(status) == 1, fixed
    assert fixed.count("`Trainer.fit` stopped") == 1
    assert "💡" not in fixed and "litlogger" not in fixed
    # ... and the one copy went through the root handler (Hydra's format, so also into train.log)
    assert "[lightning.pytorch.utilities.rank_zero][INFO] - GPU available" in fixed
    assert not any(logging.getLogger(n).handlers for n in console.LIGHTNING_LOGGERS)


def test_unactionable_warnings_are_silenced_at_their_source(fit_outputs):
    (_, raw, raw_every), (_, fixed, fixed_every) = fit_outputs
    interval = "smaller than the logging interval"
    assert any(interval in w for w in raw) and raw_every == 50  # 3 batches < Lightning's default 50
    assert not any(interval in w for w in fixed) and fixed_every == 3  # FitLogInterval fitted it to the epoch
    leaf = "isinstance(treespec, LeafSpec)` is deprecated"
    if any(leaf in w for w in raw):  # Lightning's _pytree.py on torch >= 2.10
        assert not any(leaf in w for w in fixed)


def test_epoch_logger_writes_one_line_per_epoch(fit_outputs):
    _, (fixed, _, _) = fit_outputs
    lines = [ln for ln in fixed.splitlines() if "] - epoch " in ln]
    assert len(lines) == 2, fixed
    assert lines[0].startswith("[pyra_bench][INFO] - epoch 1/2 | loss ")
    assert "| lr 0.25 |" in lines[0] and "% (epoch 1)" in lines[0]
    assert "epoch 2/2" in lines[1] and "% (epoch 2)" in lines[1]


def test_log_every_n_steps_for():
    assert console.log_every_n_steps_for(31) == 31     # VTAB-1k: 1,000 images / batch 32, drop_last
    assert console.log_every_n_steps_for(500) == 50    # long epochs keep Lightning's default
    assert console.log_every_n_steps_for(1) == 1
    with pytest.raises(ValueError, match="num_batches"):
        console.log_every_n_steps_for(0)


def test_fit_log_interval_keeps_a_smaller_interval_and_counts_per_rank():
    from types import SimpleNamespace

    class DM:
        def train_dataloader(self):
            return range(31)  # 31 batches (VTAB-1k: 1,000 images, batch 32, drop_last)

    def fitted(every, limit=None, world=1):
        t = SimpleNamespace(datamodule=DM(), log_every_n_steps=every, limit_train_batches=limit, world_size=world)
        console.FitLogInterval().setup(t, None, "fit")
        return t.log_every_n_steps

    assert fitted(50) == 31 and fitted(10) == 10
    assert fitted(50, limit=2) == 2 and fitted(50, limit=0.5) == 15
    assert fitted(50, world=4) == 8  # ceil(31 / 4) batches per rank


class _Stream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_bar_only_on_a_terminal(monkeypatch):
    monkeypatch.delenv("PYRA_PROGRESS", raising=False)
    assert console.progress_bar_enabled(_Stream(True)) is True
    assert console.progress_bar_enabled(_Stream(False)) is False
    assert console.progress_bar_enabled(object()) is False  # no isatty at all
    monkeypatch.setenv("PYRA_PROGRESS", "1")
    assert console.progress_bar_enabled(_Stream(False)) is True
    assert console.EpochLogger().enabled is False  # a bar is shown instead
    monkeypatch.setenv("PYRA_PROGRESS", "0")
    assert console.progress_bar_enabled(_Stream(True)) is False
    assert console.EpochLogger().enabled is True


def test_epoch_line_format():
    cb = console.EpochLogger(enabled=True, prefix="train: ")
    assert cb.format_line(1, 30, None, None) == "train: epoch 1/30 | loss - | lr - | top-1 -"
    cb.top1 = (10, 71.234)
    line = cb.format_line(12, 30, 0.51234, 9.98e-4)
    assert line == "train: epoch 12/30 | loss 0.5123 | lr 0.000998 | top-1 71.23% (epoch 10)"


class _SelfEvaluating(_Tiny):
    """Evaluates in its own on_train_epoch_end (after the callbacks' hook), keeping an eval_history with
    global epochs, as pyra_bench's AdaptationModule does; its lr halves each epoch."""

    epoch_offset = 10

    def __init__(self):
        super().__init__()
        self.eval_history = {}

    def on_train_epoch_end(self):
        if self.current_epoch % 2 == 1:  # evaluated after epochs 12 and 14 only
            self.eval_history[self.epoch_offset + self.current_epoch + 1] = 50.0 + self.current_epoch

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}


def test_epoch_logger_waits_for_the_modules_own_evaluation():
    from torch.utils.data import TensorDataset

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("test_epoch_logger")
    logger.addHandler(handler)
    logger.propagate, logger.level = False, logging.INFO
    ds = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    dm = L.LightningDataModule.from_datasets(train_dataset=ds, batch_size=8)
    trainer = L.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
                        callbacks=[console.EpochLogger(logger=logger, enabled=True)])
    trainer.fit(_SelfEvaluating(), datamodule=dm)
    assert [ln.split(" | ")[0] for ln in lines] == ["epoch 11/14", "epoch 12/14", "epoch 13/14", "epoch 14/14"]
    assert [ln.split(" | ")[2] for ln in lines] == ["lr 0.4", "lr 0.2", "lr 0.1", "lr 0.05"]  # the epoch's own
    assert [ln.split(" | ")[3] for ln in lines] == ["top-1 -", "top-1 51.00% (epoch 12)", "top-1 51.00% (epoch 12)",
                                                    "top-1 53.00% (epoch 14)"]


def test_attach_run_log(tmp_path):
    root = logging.getLogger()
    before = list(root.handlers)
    h1 = console.attach_run_log(tmp_path / "a")
    try:
        logging.getLogger("pyra_bench.train").info("first run line")
        h2 = console.attach_run_log(tmp_path / "b")  # the next run of a multirun: its own file only
        assert h1 not in root.handlers and h2 in root.handlers
        logging.getLogger("lightning.pytorch").info("second run line")
        console.detach_run_log(h2)
        assert root.handlers == before
        a, b = (tmp_path / "a" / "train.log").read_text(), (tmp_path / "b" / "train.log").read_text()
        assert "[pyra_bench.train][INFO] - first run line" in a and "second" not in a
        assert "[lightning.pytorch][INFO] - second run line" in b and "first" not in b
        console.attach_run_log(tmp_path / "a").close()  # appends: a resumed run continues its log
        assert (tmp_path / "a" / "train.log").read_text().startswith(a)
    finally:
        for h in list(root.handlers):
            if h not in before:
                console.detach_run_log(h)


# The demo's console output as a user sees it (each Lightning line once, no adverts, one line per epoch, the
# run log) is checked on `python -m pyra_bench.train trainer=smoke` in tests/test_packaging.py::
# test_installed_demo: the same code from the wheel, one demo run for both checks.
