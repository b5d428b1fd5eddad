"""Checks of a composed config before any work: the first step of every run and every bench.

:func:`check_run_config` (``conf/train.yaml``), :func:`check_bench_config` (``conf/bench.yaml``) and
:func:`check_prepare_config` (``conf/prepare.yaml``) look at
every setting they know, collect *all* the problems and raise one
:class:`~pyra_bench.errors.ConfigCheckError` that lists them, one line each: the key, the bad value, what is
allowed and how to fix it. They build nothing, write nothing and create no folder (an output folder is
checked by walking up to its nearest existing ancestor); the only outside contact is one short TCP
connection attempt when ``backbone.weights=hub`` (:func:`check_hub_reachable`). Keys a config does not have
are not checked (the code that reads them reports them).

Stand-alone checks: :func:`check_experiment_name` (a misspelt experiment, which Hydra's ``optional``
default would drop without a word), :func:`check_hub_reachable`, :func:`check_output_dir`.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import math
import os
import platform
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigCheckError, HubUnreachableError, InputError
from .records import OPTIMIZED_METRICS

#: The evaluation protocols of a run. A copy of the keys of ``pyra_bench.train.PROTOCOLS`` (which also maps
#: each to its training and evaluated split); a test keeps the two in step.
PROTOCOLS = ("final", "tuning")
#: ``trainer.evaluation``: every ``eval_every`` epochs, only after the last, or the listed ``eval_epochs``. A copy
#: of ``pyra_bench.pipeline.EVALUATIONS``; a test keeps the two in step.
EVALUATIONS = ("every_n", "final", "epochs")
#: ``trainer.eval_precision``: the names ``pyra_bench.lit.AdaptationModule`` tells apart (any other would
#: silently mean ``auto``).
EVAL_PRECISIONS = ("auto", "32", "32-true", "fp32", "bf16", "bf16-mixed")
#: Seeds Lightning / NumPy accept: ``0 <= seed < 2**32``.
SEED_LIMIT = 2**32
#: Boolean switches of the run config (``true`` / ``false`` only: ``force=1`` or ``force=yes`` is refused).
RUN_FLAGS = ("force", "verify_images", "measure_throughput", "export_inference_model")
BENCH_FLAGS = ("channels_last", "params", "flops", "throughput", "load_weights", "update_record")
_ABSENT = object()  # a key the config does not have
_BAD = object()     # a value already reported


@dataclass(frozen=True)
class Problem:
    """One invalid setting: ``key=value: what is wrong, what is allowed, how to fix it``."""

    key: str
    value: Any
    message: str

    def __str__(self) -> str:
        return f"{self.key}={_show(self.value)}: {self.message}"


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Checker:
    """Collects the problems of one config (one per key); each helper returns the checked value, or ``_BAD``
    (already reported) / ``_ABSENT`` (no such key), so that cross-checks only see good values."""

    def __init__(self, cfg: DictConfig, machine: bool = True) -> None:
        self.cfg, self.problems = cfg, []
        self.machine = machine  # also what depends on this machine (its devices, the hub's reachability)

    def add(self, key: str, value: Any, message: str) -> object:
        if all(p.key != key for p in self.problems):  # a key read twice (an unresolvable value) is one line
            self.problems.append(Problem(key, value, message))
        return _BAD

    def get(self, key: str) -> Any:
        try:
            v = OmegaConf.select(self.cfg, key, default=_ABSENT, throw_on_missing=True)
        except OmegaConfBaseException as e:
            first = str(e).splitlines()[0]
            return self.add(key, self._raw(key), f"cannot be resolved ({first}); set {key}=<value>")
        return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v

    def _raw(self, key: str) -> Any:
        parent, _, last = key.rpartition(".")
        try:
            node = OmegaConf.select(self.cfg, parent) if parent else self.cfg
            return OmegaConf.to_container(node, resolve=False).get(last)
        except Exception:  # noqa: BLE001 - only for the message
            return "?"

    def integer(self, key: str, low: int, high: int | None = None, null: str | None = None,
                meaning: str = "", example: Any = None) -> Any:
        """An int in ``[low, high)``; ``null`` (when given) says what null means."""
        v = self.get(key)
        if v is _ABSENT or v is _BAD or (v is None and null):
            return v
        allowed = f"a whole number >= {low}" + (f" and < {high}" if high is not None else "")
        if null:
            allowed = f"null ({null}) or {allowed}"
        if not _is_int(v) or v < low or (high is not None and v >= high):
            return self.add(key, v, f"must be {allowed}" + (f" ({meaning})" if meaning else "")
                            + f"; set e.g. {key}={example if example is not None else low}")
        return v

    def number(self, key: str, low: float = 0.0, high: float | None = None, low_open: bool = False,
               meaning: str = "", example: Any = None) -> Any:
        """A finite number in ``[low, high)`` (``(low, high)`` with ``low_open``)."""
        v = self.get(key)
        if v is _ABSENT or v is _BAD:
            return v
        lo = f"> {low:g}" if low_open else f">= {low:g}"
        allowed = f"a finite number {lo}" + (f" and < {high:g}" if high is not None else "")
        ok = _is_number(v) and math.isfinite(v) and (v > low if low_open else v >= low) and (high is None or v < high)
        if not ok:
            return self.add(key, v, f"must be {allowed}" + (f" ({meaning})" if meaning else "")
                            + (f"; set e.g. {key}={example}" if example is not None else ""))
        return v

    def choice(self, key: str, choices: tuple | list, meaning: str = "") -> Any:
        v = self.get(key)
        if v is _ABSENT or v is _BAD:
            return v
        if v not in choices:
            close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
            return self.add(key, v, f"unknown {meaning or key.rsplit('.', 1)[-1]}; valid choices: "
                                    f"{', '.join(_show(c) if c is None else str(c) for c in choices)}"
                                    + (f" (did you mean {key}={close[0]}?)" if close else ""))
        return v

    def value(self, key: str) -> Any:
        """The value, or None when the key is absent or its value was already reported."""
        v = self.get(key)
        return None if v is _ABSENT or v is _BAD else v

    def flag(self, key: str) -> Any:
        v = self.get(key)
        if v is not _ABSENT and v is not _BAD and not isinstance(v, bool):
            return self.add(key, v, f"must be true or false; set {key}=true or {key}=false")
        return v

    def writable_dir(self, key: str) -> None:
        v = self.get(key)
        if v is _ABSENT or v is _BAD:
            return
        if v is None or str(v).strip() == "":
            self.add(key, v, f"must be a folder path; set {key}=<folder>")
        elif (why := output_dir_problem(v)) is not None:
            self.add(key, v, f"{why}; set {key}=<a folder you can write to>")

    def raise_if_any(self, what: str) -> None:
        if self.problems:
            raise ConfigCheckError(what, self.problems)


# ---------------------------------------------------------------------------------------------------------
# Output folders
# ---------------------------------------------------------------------------------------------------------
def output_dir_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be used as an output folder (None: it can). Creates nothing: a missing folder is
    judged by its nearest existing ancestor, which must be a folder this user can write to."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    try:
        if p.exists():
            if not p.is_dir():
                return "exists and is not a folder"
            if not os.access(p, os.W_OK | os.X_OK):
                return "is a folder this user cannot write to"
            return None
        anc = p
        while not anc.exists():
            if anc.is_symlink():
                return f"cannot be created: {anc} is a broken symbolic link"
            anc = anc.parent
    except OSError as e:
        return f"cannot be checked ({e})"
    if not anc.is_dir():
        return f"cannot be created: {anc} is a file, not a folder"
    if not os.access(anc, os.W_OK | os.X_OK):
        return f"cannot be created: {anc} (its nearest existing folder) is not writable by this user"
    return None


def check_output_dir(path: str | os.PathLike, key: str = "results_dir") -> None:
    """Raise :class:`ConfigCheckError` when ``path`` cannot be used as an output folder (creates nothing)."""
    ch = _Checker(OmegaConf.create({}))
    if (why := output_dir_problem(path)) is not None:
        ch.add(key, str(path), f"{why}; set {key}=<a folder you can write to>")
    ch.raise_if_any("output folder")


# ---------------------------------------------------------------------------------------------------------
# Lightning names and this machine's devices
# ---------------------------------------------------------------------------------------------------------
#: Lightning's names, copied so that checking a config needs no Lightning import (seconds; a sweep checks
#: every job before it starts): the ``precision`` values its Trainer accepts, their aliases, the accelerators
#: and strategies it registers itself. Tests keep each copy equal to what the installed Lightning has.
PRECISIONS: tuple[Any, ...] = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
                               "bf16-mixed", "32-true", "64-true", 64, 32, 16, "64", "32", "16", "bf16")
PRECISION_ALIASES = {"64": "64-true", "32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}
ACCELERATORS = ("cpu", "cuda", "mps", "tpu")
STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_false",
              "ddp_find_unused_parameters_true", "ddp_spawn_find_unused_parameters_false",
              "ddp_spawn_find_unused_parameters_true", "ddp_fork_find_unused_parameters_false",
              "ddp_fork_find_unused_parameters_true", "ddp_notebook_find_unused_parameters_false",
              "ddp_notebook_find_unused_parameters_true", "deepspeed", "deepspeed_stage_1", "deepspeed_stage_2",
              "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload",
              "deepspeed_stage_3_offload_nvme", "fsdp", "fsdp_cpu_offload", "single_device", "single_xla",
              "xla_debug", "xla", "single_tpu")


def _lightning_loaded() -> bool:
    """Whether Lightning's trainer package is imported: only then can code have registered accelerators or
    strategies of its own, so before that the copies above are exactly its registries."""
    return "lightning.pytorch" in sys.modules


@functools.cache
def lightning_precisions() -> tuple[Any, ...]:
    """Every ``precision`` value Lightning's Trainer accepts, from Lightning itself (names, ints, aliases);
    the checks use the copy :data:`PRECISIONS`."""
    from typing import get_args

    from lightning.fabric.plugins.precision import precision as p

    return (get_args(p._PRECISION_INPUT_STR) + get_args(p._PRECISION_INPUT_INT)
            + get_args(p._PRECISION_INPUT_STR_ALIAS))


def _canonical_precision(v: Any) -> str:
    return PRECISION_ALIASES.get(str(v), str(v))


def lightning_accelerators() -> tuple[str, ...]:
    """``auto``, ``gpu`` and every accelerator registered with Lightning (cpu, cuda, mps, tpu ...)."""
    if not _lightning_loaded():
        return ("auto", "gpu", *sorted(ACCELERATORS))
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))


def lightning_strategies() -> tuple[str, ...]:
    """``auto`` and every strategy registered with Lightning (ddp, ddp_spawn, fsdp, deepspeed ...)."""
    if not _lightning_loaded():
        return ("auto", *STRATEGIES)
    from lightning.pytorch.strategies import StrategyRegistry

    return ("auto", *StrategyRegistry.available_strategies())


def visible_devices(accelerator: str) -> int:
    """How many devices of a concrete Lightning accelerator (cpu, cuda, mps, tpu) this process sees: as
    Lightning's accelerator classes count them (cpu: 1, cuda: torch's count, mps: 1 when available), without
    importing Lightning unless it is loaded already or XLA (tpu) is installed."""
    import importlib.util

    if not _lightning_loaded() and accelerator in ACCELERATORS and (
            accelerator != "tpu" or importlib.util.find_spec("torch_xla") is None):
        import torch

        if accelerator == "cpu":
            return 1
        if accelerator == "cuda":
            os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as Lightning: count without a CUDA context
            return int(torch.cuda.device_count())
        if accelerator == "mps":
            return int(os.getenv("DISABLE_MPS", "0") != "1" and torch.backends.mps.is_available()
                       and platform.processor() in ("arm", "arm64"))
        return 0  # tpu without torch_xla
    from lightning.pytorch.accelerators import AcceleratorRegistry

    cls = AcceleratorRegistry[accelerator]["accelerator"]
    return int(cls.auto_device_count()) if cls.is_available() else 0


#: Lightning's choice for ``auto`` (first visible) and for ``gpu`` (``_AcceleratorConnector``'s order).
_AUTO_ORDER, _GPU_ORDER = ("tpu", "mps", "cuda"), ("mps", "cuda")


def _concrete_accelerator(name: str) -> str | None:
    """The accelerator Lightning would use for ``name`` here; None when ``gpu`` finds no GPU."""
    order = {"auto": _AUTO_ORDER, "gpu": _GPU_ORDER}.get(name)
    if order is None:
        return name
    found = next((a for a in order if visible_devices(a) > 0), None)
    return found or ("cpu" if name == "auto" else None)


def _no_device_message(accelerator: str) -> str:
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if accelerator in ("gpu", "cuda"):
        return ("no GPU is visible on this machine (torch.cuda.is_available() is False"
                + (f", CUDA_VISIBLE_DEVICES={cvd!r}" if cvd is not None else "") + ")")
    return f"no {accelerator} device is visible on this machine"


def _parse_devices(v: Any) -> tuple[int | None, list[int] | None] | str:
    """``trainer.devices`` -> (count, indices) -- count -1 = all visible, both None for ``auto`` -- or why
    it is not a valid value."""
    if isinstance(v, str):
        s = v.strip()
        if s == "auto":
            return None, None
        if re.fullmatch(r"-?\d+", s):
            v = int(s)
        elif re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", s):
            v = [int(x) for x in s.split(",") if x.strip()]
        else:
            return "not a device count or list"
    if _is_int(v):
        return (v, None) if v >= 1 or v == -1 else "a count must be >= 1 (or -1: all visible devices)"
    if isinstance(v, list):
        if not v or not all(_is_int(i) and i >= 0 for i in v):
            return "a list must hold device indices >= 0"
        if len(set(v)) != len(v):
            return "a list must not repeat a device"
        return len(v), list(v)
    return "not a device count or list"


# ---------------------------------------------------------------------------------------------------------
# The trainer group
# ---------------------------------------------------------------------------------------------------------
def _check_trainer(ch: _Checker) -> None:
    t = "trainer."
    epochs = ch.integer(t + "epochs", 1, meaning="training epochs; 0 or -1 would still train one", example=100)
    for key, meaning, example in (("batch_size", "training images per step and device", 32),
                                  ("eval_batch_size", "evaluation images per step and device", 64)):
        ch.integer(t + key, 1, meaning=meaning, example=example)
    ch.integer(t + "num_workers", 0, meaning="data-loading worker processes; 0 = in the main process", example=4)
    ch.integer(t + "cpu_threads", 1, null="torch's default", meaning="torch CPU threads", example=1)
    ch.integer(t + "max_steps_per_epoch", 1, null="the whole split",
               meaning="training steps per epoch; 0 would record an untrained model", example="null")
    ch.integer(t + "num_nodes", 1, meaning="machines", example=1)
    ch.number(t + "lr", low_open=True, meaning="peak learning rate", example=1e-3)
    for key, meaning in (("min_lr", "learning rate at the end of the cosine"),
                         ("warmup_lr", "learning rate at the start of the warm-up"), ("weight_decay", "AdamW's")):
        ch.number(t + key, meaning=meaning, example=0.0)
    for key in ("drop_path", "lora_dropout"):
        ch.number(t + key, high=1.0, meaning="a probability", example=0.1)

    warm = ch.get(t + "warmup_epochs")
    if warm is not _ABSENT and warm is not _BAD:
        top = f" and < trainer.epochs={epochs}" if _is_int(epochs) else ""
        if not _is_int(warm) or warm < 0 or (_is_int(epochs) and warm >= epochs):
            ch.add(t + "warmup_epochs", warm, f"must be a whole number >= 0{top} (linear warm-up epochs); "
                                              f"set e.g. {t}warmup_epochs=0")
    _check_evaluation(ch)
    ep = ch.get(t + "eval_precision")
    if ep is not _ABSENT and ep is not _BAD and (isinstance(ep, (bool, float)) or str(ep) not in EVAL_PRECISIONS):
        ch.add(t + "eval_precision", ep, f"unknown evaluation precision; valid choices: {', '.join(EVAL_PRECISIONS)} "
                                         f"(auto = as training)")
    ch.integer(t + "checkpoint_every", 1, null="every epoch", meaning="epochs between mid-stage checkpoints",
               example=1)

    from .models.lora import LORA_INITS

    ch.choice(t + "lora_init", LORA_INITS, meaning="LoRA initialisation")
    det = ch.get(t + "deterministic")
    if det is not _ABSENT and det is not _BAD and not (isinstance(det, bool) or det == "warn"):
        ch.add(t + "deterministic", det, f"must be true, false or 'warn' (Lightning's); set {t}deterministic=false")
    _check_hardware(ch)


def _check_evaluation(ch: _Checker) -> None:
    """``trainer.evaluation`` and the key it reads: ``eval_every`` (every_n) or ``eval_epochs`` (epochs). The
    epochs listed are global (a multi-stage method counts its stages' epochs one after another), so they are
    not bounded by ``trainer.epochs`` here; the run refuses one past its last epoch once its stages are known."""
    t = "trainer."
    kind = ch.choice(t + "evaluation", EVALUATIONS, meaning="evaluation schedule")
    if kind in ("final", "epochs"):  # eval_every is not read
        ch.integer(t + "eval_every", 0, null="not used", meaning=f"not used with {t}evaluation={kind}", example="null")
    else:
        ch.integer(t + "eval_every", 1, meaning="evaluate every this many epochs and after the last; for the last "
                   f"only set {t}evaluation=final", example=10)
    ev = ch.get(t + "eval_epochs")
    if ev is _ABSENT or ev is _BAD:
        return
    if ev is None:
        if kind == "epochs":
            ch.add(t + "eval_epochs", ev, f"{t}evaluation=epochs needs the list of epochs to evaluate after; set e.g. "
                                          f"{t}eval_epochs=[1,50,100], or {t}evaluation=every_n")
        return
    if not isinstance(ev, list) or not ev or not all(_is_int(e) and e >= 1 for e in ev):
        ch.add(t + "eval_epochs", ev, f"must be null or a non-empty list of epochs, each a whole number >= 1; set e.g. "
                                      f"{t}eval_epochs=[1,50,100]")
    elif len(set(ev)) != len(ev):
        ch.add(t + "eval_epochs", ev, f"lists an epoch twice; give each epoch once, e.g. {t}eval_epochs=[1,50,100]")


def _check_hardware(ch: _Checker) -> None:
    """Precision, accelerator, devices and strategy by Lightning's own names, and what this machine has."""
    t = "trainer."
    prec = ch.get(t + "precision")
    if prec is not _ABSENT and prec is not _BAD:
        allowed = PRECISIONS
        if isinstance(prec, float) or prec not in allowed:
            prec = ch.add(t + "precision", prec, "not a precision Lightning accepts; valid choices: "
                          + ", ".join(str(p) for p in allowed) + f" (e.g. {t}precision=32-true)")
    acc = ch.choice(t + "accelerator", lightning_accelerators(), meaning="Lightning accelerator")
    strategy = ch.get(t + "strategy")
    if isinstance(strategy, str) and strategy.lower() not in lightning_strategies():
        ch.add(t + "strategy", strategy, "unknown Lightning strategy; valid choices: "
               + ", ".join(lightning_strategies()) + f" (multi-GPU: {t}strategy=ddp)")
    devices = ch.get(t + "devices")
    parsed = _parse_devices(devices) if devices is not _ABSENT and devices is not _BAD else None
    if isinstance(parsed, str):
        ch.add(t + "devices", devices, f"{parsed}; valid: a count >= 1, -1 (all visible), auto, or a list of device "
                                       f"indices such as [0,1] (e.g. {t}devices=1)")
        parsed = None
    if not isinstance(acc, str) or not ch.machine:
        return
    concrete = _concrete_accelerator(acc)
    visible = visible_devices(concrete) if concrete else 0
    if visible == 0 and concrete != "cpu":
        ch.add(t + "accelerator", acc, f"{_no_device_message(concrete or acc)}; set {t}accelerator=cpu (or auto), "
                                       f"or run on a machine that has one")
        return
    if parsed is not None and parsed != (None, None):
        count, indices = parsed
        if concrete == "cpu" and (indices is not None or count == -1):
            ch.add(t + "devices", devices, f"on the CPU, devices is a number of processes >= 1; set {t}devices=1")
        elif concrete != "cpu" and indices is not None and max(indices) >= visible:
            ch.add(t + "devices", devices, f"this machine shows {visible} {concrete} device(s), indices 0.."
                                           f"{visible - 1}; set {t}devices=<indices below {visible}>")
        elif concrete != "cpu" and count > visible:
            ch.add(t + "devices", devices, f"this machine shows only {visible} {concrete} device(s); set "
                                           f"{t}devices={visible} or fewer")
    if concrete == "cpu" and prec is not _ABSENT and prec is not _BAD and _canonical_precision(prec) == "16-mixed":
        ch.add(t + "precision", prec, f"fp16 mixed precision is not supported on the CPU (Lightning would silently "
                                      f"run bf16-mixed instead); set {t}precision=bf16-mixed or 32-true")


# ---------------------------------------------------------------------------------------------------------
# Timing settings (bench.* and the run's throughput.*)
# ---------------------------------------------------------------------------------------------------------
def _device_problem(name: Any, allow_auto: bool) -> str | None:
    """Why ``name`` is not a device this machine can time on (None: it is)."""
    import torch

    allowed = ("auto, " if allow_auto else "") + "cpu, cuda or cuda:<index>"
    if allow_auto and name == "auto":
        return None
    try:
        dev = torch.device(str(name))
    except (RuntimeError, ValueError):
        return f"not a device name; valid: {allowed}"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"not a device pyra_bench times on; valid: {allowed}"
    n = torch.cuda.device_count()
    if n == 0:
        return f"{_no_device_message('cuda')}; use cpu, or run on a machine with a GPU"
    if dev.index is not None and dev.index >= n:
        return f"this machine shows {n} GPU(s): cuda:0 .. cuda:{n - 1}"
    return None


def _check_timing(ch: _Checker, prefix: str, allow_auto: bool) -> None:
    from .measure import DTYPES, normalize_dtype

    dev = ch.get(prefix + "device")
    if dev is not _ABSENT and dev is not _BAD and (why := _device_problem(dev, allow_auto)) is not None:
        dev = ch.add(prefix + "device", dev, f"{why} (e.g. {prefix}device=cpu)")
    dtype = ch.get(prefix + "dtype")
    if dtype is not _ABSENT and dtype is not _BAD:
        try:
            dtype = normalize_dtype(str(dtype))
        except ValueError:
            dtype = ch.add(prefix + "dtype", dtype, f"unknown dtype; valid choices: {', '.join(DTYPES)} (or bf16, "
                                                    f"fp16, fp32)")
    if dtype == "float16" and isinstance(dev, str) and dev != "auto" and dev.startswith("cpu"):
        ch.add(prefix + "dtype", "float16", f"float16 autocast is for CUDA; on the CPU set {prefix}dtype=bfloat16 "
                                            f"or float32")
    ch.integer(prefix + "batch_size", 1, null="512 on CUDA, 8 on the CPU", meaning="images per timed forward",
               example=8)
    ch.number(prefix + "warmup_s", meaning="seconds of warm-up; at least one forward always runs", example=3.0)
    ch.number(prefix + "duration_s", low_open=True, meaning="seconds of timed forwards", example=5.0)


# ---------------------------------------------------------------------------------------------------------
# Experiments and hub weights
# ---------------------------------------------------------------------------------------------------------
def experiment_names() -> list[str]:
    """The experiments in ``conf/experiment/`` (file names without ``.yaml``, sub-folders as ``a/b``)."""
    from .paths import CONF_DIR

    folder = Path(CONF_DIR) / "experiment"
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def _experiment_problem(name: Any) -> str | None:
    names = experiment_names()
    if name in (None, "null", "None") or str(name) in names:
        return None
    close = difflib.get_close_matches(str(name), names, n=1)
    return (f"unknown experiment; valid choices: {', '.join(names)}"
            + (f" (did you mean experiment={close[0]}?)" if close else "")
            + "; the experiments are the files of conf/experiment/")


def check_experiment_name(name: str | None) -> None:
    """Refuse an experiment that is not in ``conf/experiment/`` (null / None: no experiment)."""
    from .registry import UnknownChoiceError

    if (why := _experiment_problem(name)) is not None:
        e = UnknownChoiceError("experiment", str(name), experiment_names())
        e.args = (f"experiment={name}: {why}",)  # the registry's message plus the hint and the folder
        raise e


def _hydra_choice(cfg: DictConfig, group: str) -> Any:
    """What the user chose for a config group (Hydra records it even when an ``optional`` default dropped it)."""
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None, throw_on_resolution_failure=False)
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return _ABSENT
        choices = HydraConfig.get().runtime.choices
    return choices.get(group, _ABSENT)


_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's truthy values for its environment switches


def _hub_address() -> tuple[str, int]:
    """Host and port a hub download connects to first: the HTTPS proxy if one is set, else ``HF_ENDPOINT``."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)),
                 None)
    url = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy
                   else os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _can_connect(host: str, port: int, timeout_s: float) -> bool:
    """One TCP connection attempt, name lookup included, given up after ``timeout_s``."""
    ok: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            pass

    th = threading.Thread(target=attempt, daemon=True)  # a hanging name lookup ignores socket timeouts
    th.start()
    th.join(timeout_s)
    return bool(ok)


def _hub_files(backbone: str) -> tuple[str, str | None, list[Path | str]]:
    """(timm model name, Hugging Face repo id, files that hold its weights once downloaded) of a backbone."""
    from timm.models import get_pretrained_cfg

    from .models.backbones import get_backbone

    timm_name = get_backbone(backbone).timm_name or backbone
    pc = get_pretrained_cfg(timm_name)
    repo = getattr(pc, "hf_hub_id", None) if pc is not None else None
    if repo:
        repo = repo.split("@", 1)[0]
        names = [pc.hf_hub_filename] if getattr(pc, "hf_hub_filename", None) else ["model.safetensors",
                                                                                   "pytorch_model.bin"]
        return timm_name, repo, names
    if pc is not None and getattr(pc, "url", None):  # a plain URL: torch hub's checkpoint folder
        import torch

        return timm_name, None, [Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(pc.url).path)]
    return timm_name, None, []


def _cached(repo: str | None, files: list) -> bool:
    if repo is None:
        return any(Path(f).is_file() for f in files)
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, str(f)), str) for f in files)


def check_hub_reachable(backbone: str | None = None, timeout_s: float = 3.0) -> None:
    """Refuse ``backbone.weights=hub`` at once when the hub cannot be reached: offline mode
    (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) or no TCP connection to it (or to the HTTPS proxy)
    within ``timeout_s`` -- unless ``backbone``'s weights are already in the local cache."""
    offline = next((k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(k, "").upper() in _TRUE),
                   None)
    if offline:
        why = f"{offline}={os.environ[offline]} is set (offline mode)"
    else:
        host, port = _hub_address()
        if _can_connect(host, port, timeout_s):
            return
        why = f"{host}:{port} cannot be reached (no connection within {timeout_s:g} s; compute nodes often have no network)"
    timm_name, cache_note = None, ""
    if backbone is not None:
        try:
            timm_name, repo, files = _hub_files(backbone)
        except (InputError, RuntimeError, KeyError):
            repo, files = None, []
        if files and _cached(repo, files):
            return
        cache_note = f", and {repo or timm_name} is not in the local cache" if files else ""
    fetch = (f" (or fetch it once where there is network: python -c \"import timm; timm.create_model('{timm_name}', "
             f"pretrained=True)\", and copy the Hugging Face cache folder, HF_HOME, here)") if timm_name else ""
    raise HubUnreachableError(
        f"backbone.weights=hub needs the Hugging Face hub, but {why}{cache_note}.\n  Use a local file instead: "
        f"backbone.weights=/path/to/<file>.npz (the original ViT release), .pth or .safetensors, or set PYRA_WEIGHTS "
        f"to the folder holding the file the backbone config names{fetch}.")


def _check_weights(ch: _Checker, needed: bool = True) -> None:
    w = ch.get("backbone.weights")
    if not needed or w != "hub":
        return
    name = ch.get("backbone.name")
    if not isinstance(name, str):
        return
    from .models.backbones import BACKBONES

    if name in BACKBONES and BACKBONES.get(name).timm_name is None:
        ch.add("backbone.weights", w, f"backbone {name} has no weights on the hub (it is built from scratch); set "
                                      f"backbone.weights=none (random init) or a local file")
        return
    if not ch.machine:
        return
    why = _hub_problem(name if name in BACKBONES else None)
    if why is not None:
        ch.add("backbone.weights", w, why)


_HUB_MEMO: dict[str | None, str | None] | None = None  # set inside remember_hub_checks()


@contextlib.contextmanager
def remember_hub_checks() -> Iterator[None]:
    """Within this block the hub check runs once per backbone: a sweep checks every job, most with the same
    backbone, and an unreachable hub would cost a connection timeout per job."""
    global _HUB_MEMO
    old, _HUB_MEMO = _HUB_MEMO, {} if _HUB_MEMO is None else _HUB_MEMO
    try:
        yield
    finally:
        _HUB_MEMO = old


def _hub_problem(backbone: str | None) -> str | None:
    """:func:`check_hub_reachable`'s refusal as one line (None: the weights can be had)."""
    if _HUB_MEMO is not None and backbone in _HUB_MEMO:
        return _HUB_MEMO[backbone]
    try:
        check_hub_reachable(backbone)
        why = None
    except HubUnreachableError as e:
        why = str(e).replace("backbone.weights=hub needs", "needs").replace("\n  ", " ")
    if _HUB_MEMO is not None:
        _HUB_MEMO[backbone] = why
    return why


# ---------------------------------------------------------------------------------------------------------
# The two configs
# ---------------------------------------------------------------------------------------------------------
def check_run_config(cfg: DictConfig, machine: bool = True) -> None:
    """Check a composed ``conf/train.yaml`` config before anything is built or written; raise one
    :class:`~pyra_bench.errors.ConfigCheckError` listing every problem found. ``machine=False``: not what
    depends on this machine (the devices it has, whether the hub is reachable), e.g. to plan a sweep on
    another one."""
    ch = _Checker(cfg, machine)
    choice = _hydra_choice(cfg, "experiment")
    if choice is not _ABSENT and (why := _experiment_problem(choice)) is not None:
        ch.add("experiment", choice, why)
    ch.integer("seed", 0, SEED_LIMIT, meaning="the random seed; 2**32 = 4294967296", example=0)
    ch.choice("protocol", PROTOCOLS, meaning="protocol")
    ch.choice("optimized_metric", (None, *OPTIMIZED_METRICS), meaning="metric a sweep's job returns")
    ch.integer("retries", 0, meaning="re-tries of a failed run; 0 = none", example=1)
    for key in RUN_FLAGS:
        ch.flag(key)
    ch.writable_dir("results_dir")
    if ch.value("run_dir") is None:  # null: <runs_root>/<run_id>, made by the run
        ch.writable_dir("runs_root")
    else:
        ch.writable_dir("run_dir")
    _check_trainer(ch)
    if ch.value("measure_throughput") is True:
        _check_timing(ch, "throughput.", allow_auto=True)
    _check_weights(ch)
    ch.raise_if_any("run config")


def check_bench_config(cfg: DictConfig) -> None:
    """Check a composed ``conf/bench.yaml`` config before any model is built; raise one
    :class:`~pyra_bench.errors.ConfigCheckError` listing every problem found."""
    ch = _Checker(cfg)
    b = "bench."
    _check_timing(ch, b, allow_auto=False)
    ch.integer(b + "threads", 1, null="torch's default", meaning="torch CPU threads", example=1)
    for key in BENCH_FLAGS:
        ch.flag(b + key)
    ch.integer("num_classes", 1, meaning="classifier classes", example=100)
    out, run = ch.value(b + "output"), ch.value(b + "run")
    if out is None or run:  # bench.run writes into output_dir whatever bench.output says
        ch.writable_dir(b + "output_dir")
    if out is not None:
        p = Path(str(out)).expanduser()
        if p.is_dir():
            ch.add(b + "output", out, f"is a folder; give a file name, e.g. {b}output={p / 'bench.json'}, or set "
                                      f"{b}output=null to write into {b}output_dir")
        elif (why := output_dir_problem(p.parent)) is not None:
            ch.add(b + "output", out, f"its folder {why}; set {b}output=<a file in a folder you can write to>")
    records = ch.value(b + "records_dir")
    if records is not None and run and ch.value(b + "update_record") is True:
        p = Path(str(records)).expanduser()
        if not p.is_dir():
            ch.add(b + "records_dir", records, f"is not a folder (it should hold the runs' records); set {b}records_dir"
                                               f"=<the runs' results_dir> or null (each run's own results_dir)")
        elif not os.access(p, os.W_OK | os.X_OK):
            ch.add(b + "records_dir", records, f"is not writable by this user; set {b}update_record=false or "
                                               f"another {b}records_dir")
    _check_weights(ch, needed=ch.value(b + "load_weights") is True)
    ch.raise_if_any("bench config")


def check_prepare_config(cfg: DictConfig) -> None:
    """Check a composed ``conf/prepare.yaml`` config before any task folder is made; raise one
    :class:`~pyra_bench.errors.ConfigCheckError` listing every problem found (the task names and the reader
    are checked by :func:`pyra_bench.data.prepare.run`)."""
    ch = _Checker(cfg)
    ch.writable_dir("data_root")
    ch.integer("jpeg_quality", 1, 101, meaning="PIL's JPEG quality, 1 (worst) .. 100; the reference export uses 75",
               example=75)
    ch.integer("workers", 1, null="min(4, CPUs)", meaning="JPEG encoding threads", example=4)
    ch.integer("mock_examples", 1, null="real data", meaning="fake examples per TFDS split", example=2000)
    for key in ("overwrite", "verify", "download", "fail_fast", "progress"):
        ch.flag(key)
    for key in ("data_dir", "manual_dir"):
        v = ch.value(key)
        if v is not None and Path(str(v)).expanduser().exists() and not Path(str(v)).expanduser().is_dir():
            ch.add(key, v, f"exists and is not a folder; set {key}=<a folder> or null (TFDS's default)")
    ch.raise_if_any("prepare config")
