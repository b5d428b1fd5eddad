"""The Lightning module: trains what the method makes trainable, evaluates top-1 on the test split.

Optimiser and schedule follow the authors' recipe (spec section 5): AdamW; weight decay on matrices only
(biases and 1-D parameters get none); a separate parameter group for the method's own parameters with
its own lr / weight decay when the method config gives them; per-epoch linear warm-up from ``warmup_lr``
and a cosine from ``lr`` to ``min_lr`` (timm's CosineLRScheduler with ``warmup_prefix=False``: the
cosine is not shifted by the warm-up). The authors' loop applied each epoch's lr one epoch late
(epoch e trains at lr(e-1)); we apply lr(e) at epoch e.
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
import torchmetrics
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


class AdaptationModule(L.LightningModule):
    """Wraps a built model (see :func:`pyra_bench.models.build_model`) and its method."""

    def __init__(self, model: nn.Module, num_classes: int, optim: dict[str, Any], epochs: int,
                 epoch_offset: int = 0, evaluate: bool = True):
        super().__init__()
        self.model = model
        self.method = model.pyra_method
        self.optim = dict(optim)
        self.epochs = max(int(epochs), 1)
        self.epoch_offset = epoch_offset
        self.evaluate = evaluate
        self.strict_loading = False  # checkpoints hold only what trains (the backbone is frozen)
        self.train_acc = torchmetrics.Accuracy("multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy("multiclass", num_classes=num_classes)
        self.test_count = torchmetrics.SumMetric()  # images evaluated (all ranks): the split, no padding
        self.eval_images: int | None = None
        self.eval_history: dict[int, float] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss, logits = self.method.training_loss(self.model, x, y)
        extra = self.method.extra_loss(self.model)
        self.log("train/objective", loss, prog_bar=False, on_step=False, on_epoch=True)
        if extra is not None:
            self.log("train/extra_loss", extra.detach(), on_step=False, on_epoch=True)
            loss = loss + extra
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        if logits is not None:
            self.train_acc(logits.detach(), y)
            self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self.model(x), y)
        self.test_count.update(y.numel())

    def on_validation_epoch_end(self):
        acc = float(self.test_acc.compute()) * 100.0
        self.test_acc.reset()
        self.eval_images = int(self.test_count.compute())
        self.test_count.reset()
        if self.trainer.sanity_checking:
            return
        if self.trainer.state.fn == "validate":  # a stand-alone evaluation after fit: the final weights
            epoch = self.epoch_offset + self.epochs
        else:  # evaluated after this many epochs of training
            epoch = self.epoch_offset + self.current_epoch + 1
        self.eval_history[epoch] = acc
        self.log("test/top1", acc, prog_bar=True, sync_dist=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in keep or "token_reducer" in k}
        checkpoint["eval_history"] = dict(self.eval_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.eval_history = {int(k): v for k, v in checkpoint.get("eval_history", {}).items()}

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


class TrainingCost(L.Callback):
    """Training throughput and peak accelerator memory of one stage (the "training-efficient" half of the
    paper's claim), without touching the hot path: the clock is read (after one device synchronisation)
    only at the start of a training epoch and where its training part ends (the first of: validation
    start, training-epoch end), and the images are counted from batch shapes (no host-device sync).

    ``summary()``: images per second of training (forward + backward + optimiser step + data loading),
    over the epochs after the first when there are several (the first pays for warm-up, cudnn autotuning
    and loader start-up), the peak memory allocated on a CUDA device (GiB), and the device name.
    Only the epochs run in this process are timed (a resumed run times what it trains).
    """

    def __init__(self) -> None:
        self.epochs: list[tuple[int, float]] = []  # (images, seconds) per timed epoch
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

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()

    def summary(self) -> dict[str, Any] | None:
        if not self.epochs:
            return None
        timed = self.epochs[1:] if len(self.epochs) > 1 else self.epochs
        images, seconds = sum(n for n, _ in timed), sum(s for _, s in timed)
        dev = self._device or torch.device("cpu")
        from .measure import device_name

        return {
            "img_per_s": images / seconds if seconds > 0 else None,
            "images_timed": images, "seconds_timed": seconds, "epochs_timed": len(timed),
            "epochs_run": len(self.epochs), "first_epoch_s": self.epochs[0][1],
            "peak_mem_gib": (torch.cuda.max_memory_allocated(dev) / 2**30) if dev.type == "cuda" else None,
            "device": device_name(dev),
            "includes": "forward + backward + optimiser step + data loading, per device (DDP: one rank)",
        }
