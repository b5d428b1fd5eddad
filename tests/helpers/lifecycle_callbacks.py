"""Lightning callbacks that the lifecycle tests inject through the config (``+callbacks.<name>._target_``):
they interrupt a run once (a marker file remembers that they did), as a pre-emption or a crash would."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L


class _Once(L.Callback):
    def __init__(self, epoch: int, marker: str):
        self.epoch, self.marker = int(epoch), Path(marker)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch and not self.marker.exists():
            self.marker.write_text("done")
            self.fire()

    def fire(self) -> None:
        raise NotImplementedError


class SignalOnce(_Once):
    """Send ``signum`` to this process when epoch ``epoch`` (0-based) starts, i.e. after ``epoch``
    finished epochs; once."""

    def __init__(self, epoch: int, marker: str, signum: int = signal.SIGKILL):
        super().__init__(epoch, marker)
        self.signum = int(signum)

    def fire(self) -> None:
        os.kill(os.getpid(), self.signum)


class FailOnce(_Once):
    """Raise a (transient-looking) RuntimeError when epoch ``epoch`` starts; once."""

    def fire(self) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")


class RecordTrainer(L.Callback):
    """Write some Trainer attributes to a JSON file when fitting starts."""

    def __init__(self, out: str, attrs: tuple = ("gradient_clip_val", "accumulate_grad_batches")):
        self.out, self.attrs = out, list(attrs)

    def on_fit_start(self, trainer, pl_module) -> None:
        Path(self.out).write_text(json.dumps({a: getattr(trainer, a) for a in self.attrs}))


class WaitForFile(L.Callback):
    """Wait (at most ``timeout`` seconds) when fitting starts until ``path`` exists: holds a run in progress
    while a test starts a second command for it."""

    def __init__(self, path: str, timeout: float = 120.0):
        self.path, self.timeout = Path(path), float(timeout)

    def on_fit_start(self, trainer, pl_module) -> None:
        import time

        end = time.monotonic() + self.timeout
        while not self.path.exists() and time.monotonic() < end:
            time.sleep(0.1)
