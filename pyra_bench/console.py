"""What a run prints: each log line once, no adverts, one line per epoch in a batch job's log.

Under Hydra the root logger has Hydra's handler (console, and ``train.log`` when a run log is attached);
Lightning adds handlers of its own (``lightning`` always; ``lightning.pytorch`` / ``lightning.fabric``
when it is imported before any root handler exists), so every Lightning status line would appear twice.
:func:`setup_logging` leaves exactly one path (Lightning's loggers propagate to the root, no handler of
their own), drops Lightning's "💡 Tip" adverts at the logger that emits them, and silences the warnings a
user cannot act on at their source (one filter per message and module, never a category-wide ignore):

* ``isinstance(treespec, LeafSpec)`` is deprecated (``FutureWarning``): Lightning's own
  ``lightning/pytorch/utilities/_pytree.py`` still constructs torch's deprecated ``LeafSpec()`` (torch >=
  2.10); the fix belongs upstream (``torch.utils._pytree.treespec_leaf()``), nothing in a run can avoid it.
* "The number of training batches (31) is smaller than the logging interval": not filtered; the interval is
  fitted to the epoch instead (:class:`FitLogInterval`, or ``Trainer(log_every_n_steps=
  log_every_n_steps_for(num_batches))``).

``progress_bar_enabled()`` is True only when stderr is a terminal: in a SLURM log a progress bar leaves
only its last frame, so there :class:`EpochLogger` logs one line per epoch instead (epoch, loss, lr, the
latest top-1). :func:`attach_run_log` adds ``<run_dir>/train.log``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

#: Lightning loggers that get handlers of their own (their records should only reach the root's).
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
#: The loggers Lightning's ``rank_zero_info`` writes through (where its adverts are emitted).
RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                     "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")
#: Warnings no user can act on: (message regex, category, module regex of the line that warns).
UNACTIONABLE_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"(lightning\.pytorch|pytorch_lightning)\.utilities\._pytree"),
)
#: Lightning's default ``log_every_n_steps``.
LIGHTNING_LOG_EVERY_N_STEPS = 50
RUN_LOG = "train.log"
#: The format of Hydra's default job log (``[time][logger][LEVEL] - message``), used for ``train.log``.
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"

log = logging.getLogger("pyra_bench")


class DropAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing litlogger / litmodels" records."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith("💡 Tip")


_DROP_ADVERTS = DropAdverts()


def setup_logging(level: int | None = None) -> None:
    """Make each log line appear once, without adverts or unactionable warnings (idempotent).

    Call it at the start of an entry point, after Hydra configured logging (inside the ``@hydra.main``
    function). Imports Lightning first, so that its import-time handlers exist and are removed here. When
    the root logger has no handler (a plain Python session), one stderr handler is added."""
    import lightning  # noqa: F401  (its import adds the handlers removed below)

    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        if root.level > logging.INFO:
            root.setLevel(logging.INFO)
    if level is not None:
        root.setLevel(level)
    for name in LIGHTNING_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    for name in RANK_ZERO_LOGGERS:
        lg = logging.getLogger(name)
        if _DROP_ADVERTS not in lg.filters:
            lg.addFilter(_DROP_ADVERTS)
    for message, category, module in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def log_every_n_steps_for(num_batches: int, default: int = LIGHTNING_LOG_EVERY_N_STEPS) -> int:
    """A ``Trainer(log_every_n_steps=...)`` that fits an epoch of ``num_batches`` training batches.

    Lightning warns when an epoch has fewer batches than the interval (VTAB-1k: 1,000 images / 32 = 31
    batches against the default 50) and then logs no step of it. This keeps the default when an epoch is
    long enough and otherwise logs once per epoch, at its last batch (``num_batches`` as counted by Lightning:
    ``min(len(train_dataloader), limit_train_batches)``)."""
    if int(num_batches) < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    return max(1, min(int(default), int(num_batches)))


class FitLogInterval(Callback):
    """Lowers ``trainer.log_every_n_steps`` to the epoch's number of training batches when it is larger
    (:func:`log_every_n_steps_for`), before Lightning compares them: no warning, and every epoch logs its
    training steps. A smaller configured interval is kept. Reads the datamodule's training loader (per
    rank under DDP, ``limit_train_batches`` applied); does nothing when the fit has no datamodule."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        if stage != "fit" or dm is None:
            return
        try:
            n = len(dm.train_dataloader())
        except (TypeError, NotImplementedError):  # an iterable without a length
            return
        n = -(-n // max(1, int(getattr(trainer, "world_size", 1) or 1)))
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            n = min(n, limit)
        elif isinstance(limit, float) and limit < 1.0:
            n = max(1, int(n * limit))
        if n >= 1:
            trainer.log_every_n_steps = min(trainer.log_every_n_steps, log_every_n_steps_for(n))


def progress_bar_enabled(stream: Any = None) -> bool:
    """Whether to show progress bars: only on a terminal (``Trainer(enable_progress_bar=...)``).
    ``PYRA_PROGRESS=1`` / ``0`` forces it on / off."""
    forced = os.environ.get("PYRA_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def progress(iterable: Any = None, *, enabled: bool = True, **kwargs: Any):
    """A tqdm bar for work outside Lightning (image checks, caches, TFDS preparation, the demo's
    pre-training), drawn only where :func:`progress_bar_enabled` says (a terminal; ``PYRA_PROGRESS``) and
    ``enabled``; elsewhere tqdm's no-op bar, so a batch log gets no carriage-return frames."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not (enabled and progress_bar_enabled()), **kwargs)


def _scalar(v: Any) -> float | None:
    try:
        x = float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


class EpochLogger(Callback):
    """Logs one line per training epoch through ``logging`` when stderr is not a terminal (``enabled=None``;
    a progress bar is shown there instead), e.g.
    ``train: epoch 12/100 | loss 0.5123 | lr 0.000998 | top-1 71.23% (epoch 10)``.

    The loss is the epoch's mean training loss, the lr the first parameter group's during the epoch, the
    top-1 the latest evaluation's with the epoch it was measured after (the module's ``eval_history`` when
    it keeps one, else ``test/top1`` / ``val/top1``). Epochs count across a method's stages (the module's
    ``epoch_offset``). The line is written once the epoch's evaluation is known -- a module may evaluate in
    its own ``on_train_epoch_end``, which Lightning calls after the callbacks' -- i.e. when the next epoch
    starts or training ends; the lr is the one the epoch trained at (read when it started)."""

    LOSS_KEYS = ("train/loss_epoch", "train/loss")
    TOP1_KEYS = ("test/top1", "val/top1")

    def __init__(self, logger: logging.Logger | None = None, enabled: bool | None = None, prefix: str = ""):
        super().__init__()
        self.logger = logger or log
        self.enabled = (not progress_bar_enabled()) if enabled is None else bool(enabled)
        self.prefix = prefix
        self.top1: tuple[int, float] | None = None  # (epoch, value) of the latest evaluation
        self._pending: tuple[int, int | None, float | None, float | None] | None = None
        self._epoch_lr: float | None = None

    @staticmethod
    def _offset(pl_module) -> int:
        return int(getattr(pl_module, "epoch_offset", 0) or 0)

    def on_validation_end(self, trainer, pl_module) -> None:  # modules evaluated by Lightning's loop
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        v = next((_scalar(metrics[k]) for k in self.TOP1_KEYS if k in metrics), None)
        if v is not None:
            self.top1 = (self._offset(pl_module) + trainer.current_epoch + 1, v)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        offset = self._offset(pl_module)
        lr = self._epoch_lr
        metrics = trainer.callback_metrics
        loss = next((_scalar(metrics[k]) for k in self.LOSS_KEYS if k in metrics), None)
        total = offset + trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        self._pending = (offset + trainer.current_epoch + 1, total, loss, lr)

    def _flush(self, pl_module) -> None:
        if self._pending is None:
            return
        history = getattr(pl_module, "eval_history", None)
        if isinstance(history, dict) and history:
            last = max(history)
            self.top1 = (int(last), float(history[last]))
        epoch, total, loss, lr = self._pending
        self._pending = None
        self.logger.info(self.format_line(epoch, total, loss, lr))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._flush(pl_module)  # the previous epoch's line
        # the lr this epoch trains at (an epoch-interval scheduler steps before on_train_epoch_end)
        self._epoch_lr = _scalar(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else None

    def on_train_end(self, trainer, pl_module) -> None:
        self._flush(pl_module)

    def format_line(self, epoch: int, max_epochs: int | None, loss: float | None, lr: float | None) -> str:
        parts = [f"epoch {epoch}" + (f"/{max_epochs}" if max_epochs else ""),
                 f"loss {loss:.4f}" if loss is not None else "loss -",
                 f"lr {lr:.3g}" if lr is not None else "lr -",
                 f"top-1 {self.top1[1]:.2f}% (epoch {self.top1[0]})" if self.top1 else "top-1 -"]
        return self.prefix + " | ".join(parts)


def attach_run_log(run_dir: str | os.PathLike, level: int = logging.INFO) -> logging.Handler:
    """Add a file handler ``<run_dir>/train.log`` (appending: a resumed run continues its log) to the root
    logger and return it; a handler this function attached before (the previous run of a multirun) is
    removed first. :func:`detach_run_log` removes it."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_pyra_run_log", False):
            detach_run_log(h)
    path = Path(run_dir) / RUN_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(level)
    handler._pyra_run_log = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    if root.level > level or root.level == logging.NOTSET:
        root.setLevel(level)
    return handler


def detach_run_log(handler: logging.Handler | None) -> None:
    """Remove and close a handler returned by :func:`attach_run_log` (no-op for None)."""
    if handler is None:
        return
    logging.getLogger().removeHandler(handler)
    handler.close()
