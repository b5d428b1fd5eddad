"""What keeps a run's state safe: signals, per-epoch checkpoints and finished-stage files.

- :func:`handle_signals`: SIGTERM, SIGINT and the SLURM timeout signals (SIGUSR1/2) end the run with
  :class:`RunInterrupted` (exit status 128 + signal) after the last finished epoch is on disk. A signal
  that already has a handler (submitit installs its own requeue handler for its timeout signal and
  ignores SIGTERM) is left to it: one requeue mechanism. Lightning's own signal handling is switched off
  per trainer (:func:`disable_lightning_signals`), so it neither ends a run with status 0 on SIGTERM nor
  requeues a SLURM job beside submitit.
- :class:`EpochCheckpoint`: ``<run_dir>/ckpt/<stage>/last.ckpt`` after every ``every`` epochs and after a
  stage's last epoch, written atomically on the run folder's own file system; it carries the settings it
  was made with (:func:`pyra_bench.identity.result_settings`).
- :func:`save_stage` / :func:`load_stage`: a finished stage as ``<stage>.safetensors`` (tensors only) plus
  ``<stage>.json`` (method state, evaluation history, training cost, settings, the tensors' size and xxh3
  checksum; :func:`verify_stage` checks them before a run uses the stage). Nothing loaded here runs
  code: tensors come from safetensors and Lightning checkpoints are read with ``weights_only=True``.
- :func:`run_lock`: one writer per run folder. An exclusive lock (``filelock``: ``flock``) on
  ``<run_dir>/.run.lock``, held for the run's life; a second command for the same folder exits at once
  (:class:`RunInProgressError`, exit status 75) naming the run, host and process that hold it
  (``<run_dir>/.run.owner.json``). The kernel drops the lock of a process that dies (SIGKILL, a crashed node:
  on NFS when the client's lease ends), so the next command takes it over. Temporary files carry the
  process id (:func:`pyra_bench.fileio.temp_path`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint

from .errors import CheckpointFormatError, RunError
from .fileio import file_xxh3, fsync_dir, temp_path, writing
from .records import atomic_write_json

log = logging.getLogger("pyra_bench")

STAGE_FORMAT = 2  # safetensors + JSON (format 1: a torch pickle, no longer read)


class RunInterrupted(BaseException):  # noqa: N818 - not an Exception: never retried, never a "failure"
    """The run was stopped by a signal; its last finished epoch is saved and the same command resumes."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


HANDLED_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"))
                        if s is not None)


class RunInProgressError(RunError):
    """Another process holds the run folder's lock (the message names the run, host and process)."""

    exit_code = 75  # EX_TEMPFAIL: try again later
    record_failure = False  # the run is not failing: it is running elsewhere


LOCK_NAME, OWNER_NAME = ".run.lock", ".run.owner.json"


def _owner(run_dir: Path) -> str:
    try:
        o = json.loads((run_dir / OWNER_NAME).read_text())
        return (f"host {o.get('host')}, process {o.get('pid')}, started {o.get('started')} (run "
                f"{o.get('run_id')}: {' '.join(map(str, o.get('command') or []))})")
    except (OSError, ValueError, AttributeError, TypeError):
        return "another process (it has not written its owner file yet)"


@contextmanager
def run_lock(run_dir: str | os.PathLike, run_id: str) -> Iterator[None]:
    """Hold ``<run_dir>/.run.lock`` for the block (see the module docstring); :class:`RunInProgressError` at
    once when another process holds it."""
    import socket
    import sys

    from filelock import FileLock, Timeout

    from .fileio import make_dir
    from .identity import utc_now

    run_dir = make_dir(run_dir, "run folder")
    lock = FileLock(str(run_dir / LOCK_NAME), timeout=0, is_singleton=False)
    try:
        with writing(run_dir / LOCK_NAME):
            lock.acquire()
    except Timeout:
        raise RunInProgressError(
            f"{run_id} is running in another process: {_owner(run_dir)}; it holds the run folder {run_dir}. This "
            f"command stops, writing nothing; once that run ends the same command reuses its record (or resumes "
            f"it, if it was interrupted)") from None
    try:
        atomic_write_json(run_dir / OWNER_NAME, {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
                                                 "started": utc_now(), "command": list(sys.argv)})
        yield
    finally:
        (run_dir / OWNER_NAME).unlink(missing_ok=True)
        lock.release()


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise RunInterrupted(signum)


@contextmanager
def handle_signals(signals: tuple[int, ...] = HANDLED_SIGNALS) -> Iterator[None]:
    """Turn the given signals into :class:`RunInterrupted` inside the block (main thread only), except those
    that already have a handler of someone else's (e.g. submitit's)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    for s in signals:
        current = signal.getsignal(s)
        if current in (signal.SIG_DFL, signal.default_int_handler, None):
            previous[s] = current
            signal.signal(s, _raise_interrupted)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def disable_lightning_signals(trainer: L.Trainer) -> None:
    """Stop ``trainer`` from installing its SIGTERM / SLURM-requeue handlers (see the module docstring)."""
    trainer._signal_connector.register_signal_handlers = lambda: None  # noqa: SLF001 - Lightning has no switch


def _replace_atomically(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    fsync_dir(path.parent)  # make the rename itself durable


class RunClock:
    """A run's wall time and processes across resumes, kept in ``<run_dir>/clock.json``: each process that
    opens the run folder counts itself and adds its time; the time is saved with every checkpoint and stage
    file, so a killed process's time counts up to its last save (what the resumed run builds on)."""

    FILE = "clock.json"

    def __init__(self, run_dir: str | os.PathLike, fresh: bool = False):
        self.path = Path(run_dir) / self.FILE
        try:
            prev = {} if fresh or not self.path.exists() else json.loads(self.path.read_text())
        except (OSError, ValueError):
            prev = {}
        try:
            self.before, self.processes = float(prev.get("seconds", 0.0)), int(prev.get("processes", 0)) + 1
        except (TypeError, ValueError, AttributeError):  # a hand-edited or foreign file: start counting anew
            self.before, self.processes = 0.0, 1
        self._t0 = time.monotonic()
        self.save()

    def seconds(self) -> float:
        return self.before + time.monotonic() - self._t0

    def save(self) -> None:
        atomic_write_json(self.path, {"processes": self.processes, "seconds": round(self.seconds(), 3)})


class EpochCheckpoint(Checkpoint):
    """Save the whole training state (weights that train, optimiser, scheduler, loop progress, evaluation
    history, settings) to ``path`` every ``every`` epochs and after the stage's last epoch.

    A subclass of Lightning's ``Checkpoint``, so it runs after the module's ``on_train_epoch_end`` (where
    the evaluation of that epoch happens): a resumed run never repeats or loses an evaluation."""

    def __init__(self, path: str | os.PathLike, every: int = 1, on_save: Any = None):
        self.path = Path(path)
        self.every = max(1, int(every))
        self.on_save = on_save  # called after each save on rank 0 (the run's clock)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every and epoch < (trainer.max_epochs or 0):
            return
        tmp = temp_path(self.path)  # unique per process: two writers never share it
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with writing(self.path):
                trainer.save_checkpoint(tmp, weights_only=False)
                if trainer.is_global_zero:
                    _replace_atomically(tmp, self.path)
                    if self.on_save is not None:
                        self.on_save()
        finally:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)
        trainer.strategy.barrier("pyra_bench.checkpoint")


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The pyra_bench part of a Lightning checkpoint (settings, epoch), read safely; raises
    :class:`CheckpointFormatError` for a file that is truncated or not such a checkpoint."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise CheckpointFormatError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "pyra_bench" not in ckpt:
        raise CheckpointFormatError(f"{path} is not a pyra_bench training checkpoint")
    return {**ckpt["pyra_bench"], "epoch": int(ckpt.get("epoch", -1)) + 1}


# ---------------------------------------------------------------------------------------------------------
# Finished stages
# ---------------------------------------------------------------------------------------------------------
def stage_paths(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def save_stage(folder: str | os.PathLike, name: str, state_dict: Mapping[str, torch.Tensor],
               meta: Mapping[str, Any]) -> Path:
    """Write a finished stage: tensors first, then the JSON that makes the stage count as finished."""
    from .fileio import atomic_save_tensors

    tensors_path, meta_path = stage_paths(folder, name)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    atomic_save_tensors(tensors_path, tensors, metadata={"format": str(STAGE_FORMAT)})
    atomic_write_json(meta_path, {"format": STAGE_FORMAT, "stage": name, "tensors": tensors_path.name,
                                  "tensors_bytes": tensors_path.stat().st_size,
                                  "tensors_xxh3_64": file_xxh3(tensors_path), **meta})
    return meta_path


def stage_exists(folder: str | os.PathLike, name: str) -> bool:
    return stage_paths(folder, name)[1].is_file()


def read_stage_meta(meta_path: str | os.PathLike) -> dict[str, Any]:
    meta_path = Path(meta_path)
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{meta_path} is not a readable stage file ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != STAGE_FORMAT:
        raise CheckpointFormatError(f"{meta_path} is not a pyra_bench stage file of format {STAGE_FORMAT}")
    tensors = meta_path.with_name(str(meta.get("tensors")))
    if not tensors.is_file() or tensors.stat().st_size != meta.get("tensors_bytes"):
        raise CheckpointFormatError(f"{tensors} is missing or truncated (the stage file {meta_path} expects "
                                    f"{meta.get('tensors_bytes')} bytes)")
    return meta


#: Stage tensors files this process verified, by (path, size, mtime): a run checks its state before and again
#: under the run folder's lock, and a file that did not change is not read in full twice.
_VERIFIED: set[tuple[str, int, int, str]] = set()


def verify_stage(meta_path: str | os.PathLike) -> dict[str, Any]:
    """:func:`read_stage_meta`, and the tensors file read in full: its checksum (``tensors_xxh3_64``, written
    since it exists) or, for an older stage file, every tensor decoded. Run before the run folder is opened;
    raises :class:`CheckpointFormatError` naming the file."""
    meta = read_stage_meta(meta_path)
    tensors = Path(meta_path).with_name(str(meta["tensors"]))
    want = meta.get("tensors_xxh3_64")
    try:
        st = tensors.stat()
        seen = (str(tensors.resolve()), st.st_size, st.st_mtime_ns, str(want))
        if seen in _VERIFIED:
            return meta
        if want is None:
            from safetensors.torch import load_file

            load_file(str(tensors))
            _VERIFIED.add(seen)
            return meta
        got = file_xxh3(tensors)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise CheckpointFormatError(f"{tensors} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    if got != want:
        raise CheckpointFormatError(f"{tensors} does not match its checksum in {meta_path} (changed or damaged "
                                    f"since it was written)")
    _VERIFIED.add(seen)
    return meta


def load_stage(meta_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, meta) of a finished stage; raises :class:`CheckpointFormatError` when unreadable."""
    from safetensors.torch import load_file

    meta = read_stage_meta(meta_path)
    tensors = Path(meta_path).with_name(meta["tensors"])
    try:
        return load_file(str(tensors)), meta
    except Exception as e:  # noqa: BLE001
        raise CheckpointFormatError(f"{tensors} is not a readable safetensors file ({e})") from e


def quarantine(path: Path) -> Path:
    """Move an unreadable file aside (``<name>.corrupt``) so the run can redo what it held."""
    target = path.with_name(path.name + ".corrupt")
    os.replace(path, target)
    return target
