"""The Lightning module: trains what the method makes trainable, evaluates top-1 on the test split.

Optimiser and schedule follow the authors' recipe (spec section 5): AdamW; weight decay on matrices only
(biases and 1-D parameters get none); a separate parameter group for the method's own parameters with
its own lr / weight decay when the method config gives them; per-epoch linear warm-up from ``warmup_lr``
and a cosine from ``lr`` to ``min_lr`` (timm's CosineLRScheduler with ``warmup_prefix=False``: the
cosine is not shifted by the warm-up). The authors' loop applied each epoch's lr one epoch late
(epoch e trains at lr(e-1)); we apply lr(e) at epoch e.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn


def cosine_with_warmup(epoch: int, epochs: int, warmup_epochs: int, lr: float, warmup_lr: float,
                       min_lr: float) -> float:
    """The learning rate for ``epoch`` (0-based)."""
    if epoch < warmup_epochs:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def param_groups(model: nn.Module, method: Any, lr: float, weight_decay: float,
                 method_lr: float | None = None, method_wd: float | None = None) -> list[dict]:
    method_params = set(method.method_parameters(model).values()) if method is not None else set()
    groups: dict[str, dict] = {
        "decay": {"params": [], "lr": lr, "weight_decay": weight_decay, "name": "decay"},
        "no_decay": {"params": [], "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
        "method": {"params": [], "lr": method_lr if method_lr is not None else lr,
                   "weight_decay": method_wd if method_wd is not None else weight_decay, "name": "method"},
        "method_no_decay": {"params": [], "lr": method_lr if method_lr is not None else lr,
                            "weight_decay": 0.0, "name": "method_no_decay"},
    }
    separate = method_lr is not None or method_wd is not None
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or n.endswith(".bias")
        if separate and p in method_params:
            groups["method_no_decay" if no_decay else "method"]["params"].append(p)
        else:
            groups["no_decay" if no_decay else "decay"]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    """The RNG seed of one training epoch: an interrupted run resumed at epoch k draws the same shuffle
    order and dropout masks from epoch k on as an uninterrupted one."""
    return (int(seed) * 1_000_003 + int(stage) * 10_007 + int(epoch)) % (2**31 - 1)


class AdaptationModule(L.LightningModule):
    """Trains what the method makes trainable; evaluates top-1 on the protocol's split at chosen epochs.

    Args:
        model: a built model (:func:`pyra_bench.models.build_model`) carrying ``pyra_method``.
        num_classes: classes of the task.
        optim: lr, weight_decay, warmup_lr, min_lr, warmup_epochs, method_lr, method_weight_decay.
        epochs: epochs of this stage.
        epoch_offset: epochs of the stages before (evaluations are numbered by global epoch).
        eval_epochs: global epochs after which to evaluate (empty: never in this stage).
        seed / stage_index: seed the RNGs per epoch (:func:`epoch_seed`).
        settings: the run's result-changing settings, stored in every checkpoint.
        eval_precision: ``auto`` (the trainer's precision context), ``32`` or ``bf16`` (autocast).
        eval_data: the data module whose ``val_dataloader`` is evaluated (default: the trainer's).
    """

    def __init__(self, model: nn.Module, num_classes: int, optim: dict[str, Any], epochs: int,
                 epoch_offset: int = 0, eval_epochs: Iterable[int] = (), seed: int = 0, stage_index: int = 0,
                 settings: dict[str, Any] | None = None, eval_precision: str = "auto",
                 eval_data: L.LightningDataModule | None = None):
        super().__init__()
        self.model = model
        self.method = model.pyra_method
        self.optim = dict(optim)
        self.epochs = max(int(epochs), 1)
        self.epoch_offset = epoch_offset
        self.eval_epochs = {int(e) for e in eval_epochs}
        self.seed, self.stage_index = int(seed), int(stage_index)
        self.settings = dict(settings or {})
        self.eval_precision = str(eval_precision)
        self.strict_loading = False  # checkpoints hold only what trains (the backbone is frozen)
        self.eval_images: int | None = None
        self.eval_history: dict[int, float] = {}
        self._eval_data = eval_data
        self._eval_loader = None
        self._loss_sum: torch.Tensor | None = None  # this epoch's summed loss, on the device (no sync per step)
        self._loss_steps = 0
        self.last_finite_loss: tuple[int, float] | None = None  # (global epoch, mean loss)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def seed_of_epoch(self, epoch: int) -> int:
        return epoch_seed(self.seed, self.stage_index, epoch)

    def on_train_start(self) -> None:
        # A fit resumed from a checkpoint keeps the data iterator Lightning made before this epoch's seed
        # was set; it is made again below, so the resumed epoch shuffles as in an uninterrupted run.
        self._renew_iterator = self.trainer.ckpt_path is not None

    def on_train_epoch_start(self) -> None:
        seed = self.seed_of_epoch(self.current_epoch)
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        loaders = self.trainer.train_dataloader
        for dl in (loaders.values() if isinstance(loaders, dict) else
                   loaders if isinstance(loaders, (list, tuple)) else [loaders]):
            if getattr(dl, "generator", None) is not None:  # the shuffle order (single-process sampler) of
                dl.generator.manual_seed(seed)              # loaders made before this hook (epochs > first)
        opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
        self._epoch_lr = [g["lr"] for g in opt.param_groups] if opt is not None else []  # for the divergence message
        if getattr(self, "_renew_iterator", False):
            self._renew_iterator = False
            fetcher = getattr(self.trainer.fit_loop, "_data_fetcher", None)
            if fetcher is not None:
                iter(fetcher)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, logits = self.method.training_loss(self.model, x, y)
        extra = self.method.extra_loss(self.model)
        self.log("train/objective", loss, prog_bar=False, on_step=False, on_epoch=True)
        if extra is not None:
            self.log("train/extra_loss", extra.detach(), on_step=False, on_epoch=True)
            loss = loss + extra
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        d = loss.detach().float()
        self._loss_sum = d if self._loss_sum is None else self._loss_sum + d
        self._loss_steps += 1
        if logits is not None:  # a plain per-rank mean: no collective a rank-0-only callback could trigger
            acc = (logits.detach().argmax(-1) == y).float().mean()
            self.log("train/acc", acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def check_finite_loss(self) -> None:
        """End of a training epoch: raise :class:`~pyra_bench.errors.TrainingDivergedError` when its mean loss is
        NaN or infinite (one host-device synchronisation per epoch), naming the epoch, the last finite epoch
        loss and the learning rate."""
        if self._loss_sum is None:
            return
        mean, steps = float(self._loss_sum) / max(self._loss_steps, 1), self._loss_steps
        self._loss_sum, self._loss_steps = None, 0
        epoch = self.epoch_offset + self.current_epoch + 1
        if math.isfinite(mean):
            self.last_finite_loss = (epoch, mean)
            return
        from .errors import TrainingDivergedError

        lr = ", ".join(f"{v:.3g}" for v in dict.fromkeys(getattr(self, "_epoch_lr", []))) or "?"
        last = (f"the last finite epoch loss was {self.last_finite_loss[1]:.4g} (epoch {self.last_finite_loss[0]})"
                if self.last_finite_loss else "no epoch of this stage had a finite loss")
        raise TrainingDivergedError(
            f"training diverged: the loss became {mean} in epoch {epoch} ({steps} steps); {last}; lr {lr}. The run "
            f"stops and is recorded as failed, not as a result. Lower trainer.lr (or lengthen the warm-up) and run "
            f"again (with other settings: force=true or a run_tag)")

    # -- evaluation ------------------------------------------------------------------------------------
    def scheduled_evaluation(self) -> None:
        """Evaluate when this epoch is one of ``eval_epochs`` (called by :class:`ScheduledEvaluation`)."""
        epoch = self.epoch_offset + self.current_epoch + 1
        if epoch in self.eval_epochs:
            acc = self.evaluate()
            self.eval_history[epoch] = acc
            self.log("test/top1", acc, prog_bar=True, sync_dist=False, on_epoch=True)

    def _precision_context(self):
        if self.eval_precision in ("bf16", "bf16-mixed"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.eval_precision in ("32", "32-true", "fp32"):
            return contextlib.nullcontext()
        return self.trainer.precision_plugin.forward_context()

    @torch.inference_mode()
    def evaluate(self) -> float:
        """Top-1 (%) on the datamodule's evaluation split, each image counted once across DDP ranks.
        One host-device synchronisation per evaluation (the final counts)."""
        if self._eval_loader is None:
            self._eval_loader = (self._eval_data or self.trainer.datamodule).val_dataloader()
        was_training = self.model.training
        self.model.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        total = torch.zeros((), dtype=torch.long, device=self.device)
        try:
            with self._precision_context():
                for batch in self._eval_loader:
                    x, y = self._apply_batch_transfer_handler(batch, self.device)
                    correct += (self.model(x).argmax(-1) == y).sum()
                    total += y.numel()
        finally:
            self.model.train(was_training)
        correct = self.trainer.strategy.reduce(correct, reduce_op="sum")
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        self.eval_images = int(total)
        return 100.0 * float(correct) / max(int(total), 1)

    # -- checkpoints ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in keep or "token_reducer" in k}
        checkpoint["pyra_bench"] = {"settings": self.settings, "stage_index": self.stage_index,
                                    "eval_history": {str(k): v for k, v in self.eval_history.items()},
                                    "eval_images": self.eval_images}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("pyra_bench") or {}
        self.eval_history = {int(k): v for k, v in (meta.get("eval_history") or {}).items()}
        self.eval_images = meta.get("eval_images")

    def configure_optimizers(self):
        o = self.optim
        groups = param_groups(self.model, self.method, o["lr"], o["weight_decay"], o.get("method_lr"),
                              o.get("method_weight_decay"))
        opt = torch.optim.AdamW(groups, lr=o["lr"], betas=(0.9, 0.999), eps=1e-8)
        base = [g["lr"] for g in groups]
        warm = min(int(o.get("warmup_epochs", 0)), self.epochs - 1)

        def factor(i: int):
            def f(epoch: int) -> float:
                lr = cosine_with_warmup(epoch, self.epochs, warm, base[i], o.get("warmup_lr", base[i]),
                                        o.get("min_lr", 0.0))
                return lr / base[i]
            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [factor(i) for i in range(len(groups))])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class FiniteLoss(L.Callback):
    """Stop a run whose training loss went NaN or infinite, at the end of that epoch, before it is evaluated
    or checkpointed (:meth:`AdaptationModule.check_finite_loss`); put it first among the callbacks."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.check_finite_loss()


class ScheduledEvaluation(L.Callback):
    """Run the module's evaluation at the end of the scheduled epochs, before the callbacks that Lightning
    adds after the configured ones (the progress bar syncs metrics on rank 0 only: evaluating after it
    would deadlock DDP) and before checkpoints (Lightning runs ``Checkpoint`` callbacks last)."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.scheduled_evaluation()


class TrainingCost(L.Callback):
    """Training throughput and peak accelerator memory of one stage (the "training-efficient" half of the
    paper's claim), without touching the hot path: the clock is read (after one device synchronisation)
    only at the start of a training epoch and where its training part ends (training-epoch end, which
    callbacks see before the module evaluates), and the images are counted from batch shapes (no host-device sync).

    ``summary()``: images per second of training (forward + backward + optimiser step + data loading),
    over the epochs after the first of each process when there are several (a process's first epoch pays
    for warm-up, cudnn autotuning and loader start-up), the peak memory allocated on a CUDA device (GiB),
    and the device name. The epochs of earlier processes of a resumed run are kept in its checkpoints
    (Lightning's callback state), so the summary covers the whole stage: ``epochs_run`` counts every epoch,
    ``processes`` how many processes trained it.
    """

    def __init__(self) -> None:
        self.epochs: list[tuple[int, float]] = []  # (images, seconds) per timed epoch
        self.process_starts: list[int] = [0]  # index in ``epochs`` of each process's first epoch
        self._t0: float | None = None
        self._n = 0
        self._device: torch.device | None = None

    def _sync(self) -> None:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._device = pl_module.device
        if self._device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self._device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sync()
        self._t0, self._n = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._n += int(batch[0].shape[0])

    def _stop(self) -> None:
        if self._t0 is not None and self._n:
            self._sync()
            self.epochs.append((self._n, time.perf_counter() - self._t0))
        self._t0 = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": [list(e) for e in self.epochs], "process_starts": list(self.process_starts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run: the earlier processes' epochs; this process starts after them."""
        self.epochs = [(int(n), float(s)) for n, s in state.get("epochs", [])]
        self.process_starts = [*(int(i) for i in state.get("process_starts", [0])), len(self.epochs)]

    def summary(self) -> dict[str, Any] | None:
        if not self.epochs:
            return None
        firsts = set(self.process_starts)
        timed = [e for i, e in enumerate(self.epochs) if i not in firsts] or self.epochs
        images, seconds = sum(n for n, _ in timed), sum(s for _, s in timed)
        dev = self._device or torch.device("cpu")
        from .measure import device_name

        return {
            "img_per_s": images / seconds if seconds > 0 else None,
            "images_timed": images, "seconds_timed": seconds, "epochs_timed": len(timed),
            "epochs_run": len(self.epochs), "first_epoch_s": self.epochs[0][1],
            "processes": len({i for i in self.process_starts if i < len(self.epochs)}),
            "peak_mem_gib": (torch.cuda.max_memory_allocated(dev) / 2**30) if dev.type == "cuda" else None,
            "device": device_name(dev),
            "includes": "forward + backward + optimiser step + data loading, per device (DDP: one rank)",
        }
