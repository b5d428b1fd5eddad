"""The settings schema: every setting of the configs -- its type, range or choices, default and one-line
help -- written once, as pydantic models that mirror the config groups and files.

- :class:`Run` is ``conf/train.yaml`` (its sections :class:`Trainer` = ``trainer/``, :data:`Peft` = ``peft/``,
  :class:`Throughput`, :class:`Data`); :class:`BenchFile`, :class:`Prepare`, :class:`Tables` and
  :class:`Visualize` are the other entry points' configs. ``task``, ``backbone``, ``method``, ``logger`` and
  ``callbacks`` are read by their own homes (``data.tasks``, ``models.backbones``, the method registry).
- :func:`problems` validates a composed config against a model and returns *every* problem, one
  :class:`Problem` each (``key=value: what is allowed``); :func:`check` raises them as one
  :class:`~pyra_bench.errors.ConfigCheckError`. Nothing heavy is imported (no torch, no Lightning).
- A setting that cannot change a result (workers, devices, log intervals, progress, paths) is declared
  with ``execution=True``: :func:`execution_keys` and :func:`defaults` give :mod:`pyra_bench.identity` what a
  run's identity compares, and the default an older record that lacks a key is read with.
- :class:`Options` is a component's options (a method's ``method.kwargs``, declared in
  :mod:`pyra_bench.methods.options`; LoRA's), declared with the same ``opt()`` and checked one at a time by
  its constructor, as the Python API needs them.

Extending: a setting is one ``opt(...)`` line in its section; a new ``peft`` choice is one class with
``name: Literal["<choice>"]`` added to :data:`PEFT_CHOICES` (and ``conf/peft/<choice>.yaml``).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NoReturn, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .models.variants import MERGE_VARIANT_HELP, MERGE_VARIANTS


def opt(default: Any, help: str, *, execution: bool = False, null: str | None = None, what: str | None = None,
        key: str | None = None, rule: str | None = None, **constraints: Any) -> Any:
    """One setting: its default and help; ``execution``: cannot change a result; ``null``: what null means;
    ``what``: the noun of a choice's message; ``key`` / ``rule``: where an :class:`Options` field is set, if
    not under its prefix, and what it allows, if not what its type says; ``constraints``: pydantic's (``ge``,
    ``gt``, ``lt``, ``le``)."""
    extra = {k: v for k, v in (("execution", execution), ("null", null), ("what", what), ("key", key),
                               ("rule", rule)) if v}
    return Field(default, description=help, json_schema_extra=extra or None, **constraints)


class Section(BaseModel):
    """A config section: strict types (``2.5`` is no whole number, ``"0.5"`` no number, ``1`` no boolean)."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)


Flag = bool
PROTOCOLS = ("final", "tuning")
EVALUATIONS = ("every_n", "final", "epochs")
EVAL_PRECISIONS = ("auto", "32", "32-true", "fp32", "bf16", "bf16-mixed")
SEED_LIMIT = 2**32


def _choices(values: tuple, what: str) -> Any:
    """A validator taking one of ``values`` (a validator's ``ValueError`` is pydantic's ``value_error``)."""
    def check(v: Any) -> Any:
        if isinstance(v, (bool, float)) or v not in values:
            c = ", ".join("null" if c is None else str(c) for c in values)
            raise ValueError(f"unknown {what}; valid choices: {c}")
        return v
    return check


def output_dir_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be used as an output folder (None: it can). Creates nothing: a missing folder is
    judged by its nearest existing ancestor, which must be a folder this user can write to."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    try:
        if p.exists():
            if not p.is_dir():
                return "exists and is not a folder"
            return None if os.access(p, os.W_OK | os.X_OK) else "is a folder this user cannot write to"
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


def _out_dir(v: Any) -> Any:
    if v is None or not isinstance(v, str) or v.strip() == "":
        raise ValueError("must be a folder path; set it to <folder>")
    if (why := output_dir_problem(v)) is not None:
        raise ValueError(f"{why}; set it to <a folder you can write to>")
    return v


OutDir = Annotated[Any, Field(json_schema_extra={"execution": True})]



# ---------------------------------------------------------------------------------------------------------
# peft/: a discriminated union on `name` (one class per choice)
# ---------------------------------------------------------------------------------------------------------
class Lora(Section):
    """``peft=lora``: LoRA on each attention's qkv projection (the paper's PEFT)."""

    name: Literal["lora"] = "lora"
    rank: int | None = opt(None, "LoRA rank", null="the backbone's lora_rank", ge=1)
    alpha: float | None = opt(None, "LoRA alpha (scale alpha / rank)", null="rank, scale 1", gt=0)
    dropout: float = opt(0.1, "dropout on the LoRA branch's input (a probability)", ge=0, lt=1)
    init: Literal["standard", "authors"] = opt("standard", "standard: B = 0; authors: both trunc-normal 0.02",
                                              what="LoRA initialisation")


class Adapter(Section):
    """``peft=adapter``: a bottleneck adapter on each block's MLP branch (the official PYRA/NOAH Adapter)."""

    name: Literal["adapter"] = "adapter"
    dim: int | None = opt(None, "the bottleneck width d (Linear D -> d -> D)",
                          null="the backbone's adapter_dim: 4 / 8 / 12 for ViT-S / B / L", ge=1)
    dropout: float = opt(0.1, "dropout after QuickGELU (a probability; the official drop_rate_adapter)", ge=0, lt=1)
    init: Literal["standard", "authors"] = opt(
        "standard", "standard: xavier-uniform weights, N(0, 1e-6) biases; authors: trunc-normal 0.02, zero biases "
        "(what the official code's global init pass leaves)", what="adapter initialisation")


class Vpt(Section):
    """``peft=vpt``: VPT-deep, learned prompt tokens in every block (protected from merging and pruning)."""

    name: Literal["vpt"] = "vpt"
    num_tokens: int = opt(10, "prompt tokens per block (the official VISUAL_PROMPT_DIM)", ge=1)
    dropout: float = opt(0.1, "dropout on the prompts (a probability; the official drop_rate_prompt)", ge=0, lt=1)


class Prefix(Section):
    """``peft=prefix``: learned keys and values prepended in every attention (prefix tuning)."""

    name: Literal["prefix"] = "prefix"
    num_tokens: int = opt(10, "learned keys and values per attention (the official PREFIX_DIM)", ge=1)


#: The ``peft`` choices; add a class here for a new one (and its module in pyra_bench.models.peft).
PEFT_CHOICES: tuple[type[Section], ...] = (Lora, Adapter, Vpt, Prefix)
Peft = Annotated[Union[PEFT_CHOICES], Field(discriminator="name")]  # noqa: UP007 (a tuple of classes)


class _PeftOnly(Section):
    peft: Peft = opt(Lora(), "the parameter-efficient fine-tuning (conf/peft/)")


def check_peft(options: dict[str, Any]) -> Section:
    """A ``peft`` config (``{"name": "adapter", "dim": 8}``; no name: LoRA) validated: its schema object, or
    one :class:`~pyra_bench.errors.ConfigCheckError` naming every bad key, value and what is allowed."""
    data = {"peft": {"name": "lora", **dict(options)}}
    check(data, _PeftOnly, "peft")
    return _PeftOnly.model_validate(data).peft


# ---------------------------------------------------------------------------------------------------------
# trainer/: the recipe; every other key goes to lightning.pytorch.Trainer (factory.trainer_options)
# ---------------------------------------------------------------------------------------------------------
def _parse_devices(v: Any) -> tuple[int | None, list[int] | None] | str:
    """``trainer.devices`` -> (count, indices) -- count -1 = all visible, both None for ``auto`` -- or why
    it is not a valid value."""
    import re

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
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, None) if v >= 1 or v == -1 else "a count must be >= 1 (or -1: all visible devices)"
    if isinstance(v, list):
        if not v or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
            return "a list must hold device indices >= 0"
        return "a list must not repeat a device" if len(set(v)) != len(v) else (len(v), list(v))
    return "not a device count or list"


#: Lightning's names, copied so that checking needs no Lightning import (tests keep them equal to Lightning's).
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


def _precision(v: Any) -> Any:
    if isinstance(v, (float, bool)) or v not in PRECISIONS:
        raise ValueError(f"not a precision Lightning accepts; valid choices: {', '.join(map(str, PRECISIONS))} (e.g. "
                         f"trainer.precision=32-true)")
    return v


def _strategy(v: Any) -> Any:
    if isinstance(v, str) and v.lower() not in lightning_strategies():
        raise ValueError(f"unknown Lightning strategy; valid choices: {', '.join(lightning_strategies())} (multi-GPU: "
                         f"trainer.strategy=ddp)")
    return v


def _devices(v: Any) -> Any:
    if isinstance(why := _parse_devices(v), str):
        raise ValueError(f"{why}; valid: a count >= 1, -1 (all visible), auto, or a list of device indices such as "
                         f"[0,1] (e.g. trainer.devices=1)")
    return v


def _deterministic(v: Any) -> Any:
    if not (isinstance(v, bool) or v == "warn"):
        raise ValueError("must be true, false or 'warn' (Lightning's); set trainer.deterministic=false")
    return v


class Trainer(Section):
    """``trainer/``: the training recipe and the Lightning options pyra_bench checks itself."""

    model_config = ConfigDict(extra="allow")  # any other key: a lightning.pytorch.Trainer option
    target: str = opt("lightning.pytorch.Trainer", "the Trainer class", execution=True, alias="_target_")
    epochs: int = opt(100, "training epochs", ge=1)
    warmup_epochs: int = opt(10, "linear warm-up epochs (< trainer.epochs)", ge=0)
    batch_size: int = opt(32, "training images per step and device", ge=1)
    eval_batch_size: int = opt(256, "evaluation images per step and device", execution=True, ge=1)
    lr: float = opt(1e-3, "peak learning rate", gt=0)
    weight_decay: float = opt(1e-4, "AdamW's weight decay", ge=0)
    warmup_lr: float = opt(1e-6, "learning rate at the start of the warm-up", ge=0)
    min_lr: float = opt(1e-5, "learning rate at the end of the cosine", ge=0)
    drop_path: float = opt(0.1, "stochastic depth of the backbone's blocks (a probability)", ge=0, lt=1)
    evaluation: Any = opt("every_n", "every_n | final | epochs: when the evaluation split is scored")
    eval_every: int | None = opt(10, "evaluate every this many epochs and after the last")
    eval_epochs: Any = opt(None, "the global epochs to evaluate after (evaluation=epochs)")
    eval_precision: Any = opt("auto", "autocast of the evaluation forward (auto = as training)")
    checkpoint_every: int | None = opt(1, "epochs between mid-stage checkpoints", execution=True,
                                       null="every epoch", ge=1)
    compile: bool | str = opt(False, "torch.compile: true (inductor) | <backend>", execution=True)
    num_workers: int = opt(4, "data-loading worker processes; 0 = in the main process", execution=True, ge=0)
    max_steps_per_epoch: int | None = opt(None, "training steps per epoch", null="the whole split", ge=1)
    cpu_threads: int | None = opt(None, "torch CPU threads", execution=True, null="torch's default", ge=1)
    precision: Any = opt("32-true", "Lightning's precision: 32-true | bf16-mixed | 16-mixed")
    accelerator: Any = opt("auto", "Lightning accelerator", execution=True)
    devices: Any = opt(1, "a count, -1 (all), auto, or device indices", execution=True)
    strategy: Any = opt("auto", "Lightning strategy (ddp for multi-GPU)", execution=True)
    num_nodes: int = opt(1, "machines", execution=True, ge=1)
    deterministic: Any = opt(False, "Lightning's: true, false or 'warn'")
    enable_progress_bar: bool | None = opt(None, "Lightning's progress bar", execution=True, null="on at a terminal")
    log_every_n_steps: int | None = opt(None, "Lightning's logging interval", execution=True, null="fits the epoch")

    @field_validator("warmup_epochs")
    @classmethod
    def _below_epochs(cls, v: int, info: Any) -> int:
        if (e := info.data.get("epochs")) is not None and v >= e:
            raise ValueError(f"must be a whole number >= 0 and < trainer.epochs={e} (linear warm-up epochs); set "
                             f"e.g. trainer.warmup_epochs=0")
        return v

    @field_validator("eval_every")
    @classmethod
    def _every(cls, v: Any, info: Any) -> Any:
        if info.data.get("evaluation") in ("final", "epochs"):
            if v is not None and v < 0:
                raise ValueError("must be null (not used) or a whole number >= 0")
        elif v is None or v < 1:
            raise ValueError("must be a whole number >= 1 (evaluate every this many epochs and after the last; for "
                             "the last only set trainer.evaluation=final)")
        return v

    @field_validator("eval_epochs")
    @classmethod
    def _epochs(cls, v: Any, info: Any) -> Any:
        if v is None and info.data.get("evaluation") == "epochs":
            raise ValueError("trainer.evaluation=epochs needs the list of epochs to evaluate after; set e.g. "
                             "trainer.eval_epochs=[1,50,100], or trainer.evaluation=every_n")
        if v is not None and (not isinstance(v, list) or not v or not all(
                isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in v)):
            raise ValueError("must be null or a non-empty list of epochs, each a whole number >= 1")
        if v is not None and len(set(v)) != len(v):
            raise ValueError("lists an epoch twice; give each epoch once, e.g. [1,50,100]")
        return v

    _precision = field_validator("precision")(lambda v: _precision(v))
    _strategy = field_validator("strategy")(lambda v: _strategy(v))
    _devices = field_validator("devices")(lambda v: _devices(v))
    _deterministic = field_validator("deterministic")(lambda v: _deterministic(v))
    _evaluation = field_validator("evaluation")(lambda v: _choices(EVALUATIONS, "evaluation schedule")(v))
    _eval_precision = field_validator("eval_precision")(
        lambda v: _choices(EVAL_PRECISIONS, "evaluation precision")(str(v) if isinstance(v, int) else v))
    _accelerator = field_validator("accelerator")(
        lambda v: _choices(lightning_accelerators(), "Lightning accelerator")(v))


#: The recipe keys of ``trainer/`` (what is not a lightning.pytorch.Trainer option).
LIGHTNING_FIELDS = ("target", "precision", "accelerator", "devices", "strategy", "num_nodes", "deterministic",
                    "enable_progress_bar", "log_every_n_steps")
RECIPE_FIELDS = frozenset(n for n in Trainer.model_fields if n not in LIGHTNING_FIELDS)


# ---------------------------------------------------------------------------------------------------------
# The operating point
# ---------------------------------------------------------------------------------------------------------
OPERATING_POINTS = ("none, low, high, r<N>, tome:<r>,<inflection>, [r_0, ..., r_L-1], flops:<fraction in (0, 1]>, "
                    "speedup:<x > 1>")


def _fraction(s: str, high: float | None) -> bool:
    try:
        f = float(s)
    except ValueError:
        return False
    return math.isfinite(f) and f > 0 and (high is None or f <= high)


def _operating_point(v: Any) -> Any:
    """The forms :func:`pyra_bench.models.schedules.resolve_schedule` and the targets take (a list's or a
    ``tome:`` form's numbers are checked against the backbone when the model is built)."""
    ok = v is None or isinstance(v, (list, dict)) or isinstance(v, int) and not isinstance(v, bool) and v >= 0
    why = "a number is no operating point: a FLOPs budget is flops:<fraction>, a constant merge r<N>" \
        if isinstance(v, float) else "not an operating point"
    if isinstance(v, str):
        head, _, tail = v.partition(":")
        ok = (v in ("none", "null", "None", "low", "high") or v[:1] == "r" and v[1:].isdigit()
              or head == "tome" and bool(tail) or head == "flops" and _fraction(tail, 1.0)
              or head == "speedup" and _fraction(tail, None) and float(tail) > 1)
        if head == "flops" and not ok:
            why = f"a FLOPs budget is a fraction of the backbone's MACs in (0, 1], got {v!r}"
    if not ok:
        raise ValueError(f"{why}; valid forms: {OPERATING_POINTS}")
    return v


# ---------------------------------------------------------------------------------------------------------
# conf/train.yaml
# ---------------------------------------------------------------------------------------------------------
class Throughput(Section):
    device: str = opt("auto", "auto | cpu | cuda | cuda:<i>")
    batch_size: int | None = opt(None, "images per timed forward", null="512 on CUDA, 8 on the CPU", ge=1)
    dtype: str = opt("float32", "float32 | bfloat16 | float16 (CUDA)")
    warmup_s: float = opt(10.0, "seconds of warm-up", ge=0)
    duration_s: float = opt(10.0, "seconds of timed forwards", gt=0)


class Data(Section):
    cache: bool | None = opt(None, "the input cache", execution=True, null="on for folder data")
    cache_dir: str | None = opt(None, "the cache folder", execution=True, null="$PYRA_INPUT_CACHE or ~/.cache")
    cache_max_gb: float = opt(64, "the whole cache folder's size limit", execution=True, gt=0)
    link_root: str | None = opt(None, "a folder symlinked images may resolve inside", execution=True)


class Backbone(Section):
    """``backbone/``: read by :func:`pyra_bench.models.backbones.backbone_spec_from_config`; here only what
    identity needs to know."""

    model_config = ConfigDict(extra="allow")
    weights: Any = opt(None, "hub | none | demo | <file>: its source and hash are recorded as weights.*",
                       execution=True)
    merge_split: Literal[MERGE_VARIANTS["merge_split"]] = opt(
        MERGE_VARIANTS["merge_split"][0], MERGE_VARIANT_HELP["merge_split"], what="backbone.merge_split")
    merge_site: Literal[MERGE_VARIANTS["merge_site"]] = opt(
        MERGE_VARIANTS["merge_site"][0], MERGE_VARIANT_HELP["merge_site"], what="backbone.merge_site")


class Run(Section):
    """``conf/train.yaml``: one run. Groups read elsewhere (task, backbone, method, logger, callbacks, ...)
    pass through."""

    model_config = ConfigDict(extra="allow")
    peft: Peft = opt(Lora(), "the parameter-efficient fine-tuning (conf/peft/)")
    backbone: Backbone = opt(Backbone(), "the frozen ViT (conf/backbone/)")
    logger: Any = opt(None, "loggers (conf/logger/)", execution=True)
    trainer: Trainer = opt(Trainer(), "the recipe and Lightning options (conf/trainer/)")
    throughput: Throughput = opt(Throughput(), "throughput after training (measure_throughput=true)", execution=True)
    data: Data = opt(Data(), "the input cache", execution=True)
    compression: Any = opt(None, "the operating point: " + OPERATING_POINTS)
    budget: Any = opt(None, "the operating point of every compressing method of a sweep", execution=True)
    seed: int = opt(0, "the random seed", ge=0, lt=SEED_LIMIT)
    protocol: Any = opt("final", "final (train800val200 -> test) | tuning (train800 -> val200)")
    optimized_metric: Any = opt(None, "the metric a sweep's job returns", execution=True)
    retries: int = opt(1, "re-tries of a failed run; 0 = none", execution=True, ge=0)
    force: Flag = opt(False, "re-train even if the record exists", execution=True)
    verify_images: Flag = opt(True, "decode every image before training", execution=True)
    measure_throughput: Flag = opt(False, "time the inference model after training", execution=True)
    export_inference_model: Flag = opt(True, "export the LoRA-merged model", execution=True)
    results_dir: OutDir = opt("results/runs", "where run records are written", execution=True)
    runs_root: OutDir = opt("outputs/runs", "where run folders are made", execution=True)
    run_dir: OutDir = opt(None, "this run's folder", execution=True, null="<runs_root>/<run_id>")

    _protocol = field_validator("protocol")(lambda v: _choices(PROTOCOLS, "protocol")(v))
    _metric = field_validator("optimized_metric")(
        lambda v: _choices((None, "top1", "top1_best"), "metric a sweep's job returns")(v))
    _points = field_validator("compression", "budget")(lambda v: _operating_point(v))
    _dirs = field_validator("results_dir", "runs_root")(lambda v: _out_dir(v))
    _run_dir = field_validator("run_dir")(lambda v: v if v is None else _out_dir(v))


# ---------------------------------------------------------------------------------------------------------
# The other entry points
# ---------------------------------------------------------------------------------------------------------
class Bench(Section):
    model_config = ConfigDict(extra="allow")
    batch_size: int | None = opt(None, "images per timed forward", null="512 on CUDA, 8 on the CPU", ge=1)
    warmup_s: float = opt(3.0, "seconds of warm-up", ge=0)
    duration_s: float = opt(5.0, "seconds of timed forwards", gt=0)
    threads: int | None = opt(None, "torch CPU threads", null="torch's default", ge=1)
    channels_last: Flag = opt(False, "channels-last memory format")
    params: Flag = opt(True, "count parameters")
    flops: Flag = opt(True, "count MACs")
    throughput: Flag = opt(True, "time forwards")
    load_weights: Flag = opt(False, "load backbone.weights")
    update_record: Flag = opt(True, "write the throughput into each run's record")


class BenchFile(Section):
    model_config = ConfigDict(extra="allow")
    bench: Bench = opt(Bench(), "what and how to measure")
    num_classes: int = opt(100, "classifier classes", ge=1)
    compression: Any = opt(None, "the operating point: " + OPERATING_POINTS)
    _points = field_validator("compression")(lambda v: _operating_point(v))


class Prepare(Section):
    model_config = ConfigDict(extra="allow")
    data_root: OutDir = opt("data/vtab-1k", "the VTAB-1k folder")
    jpeg_quality: int = opt(75, "PIL's JPEG quality, 1 (worst) .. 100", ge=1, lt=101)
    workers: int | None = opt(None, "JPEG encoding threads", null="min(4, CPUs)", ge=1)
    mock_examples: int | None = opt(None, "fake examples per TFDS split", null="real data", ge=1)
    overwrite: Flag = opt(False, "rebuild prepared tasks")
    verify: Flag = opt(False, "decode every image afterwards")
    download: Flag = opt(True, "download TFDS data")
    fail_fast: Flag = opt(False, "stop at the first task that fails")
    progress: Flag = opt(True, "progress bars")
    _dirs = field_validator("data_root")(lambda v: _out_dir(v))


class Paired(Section):
    model_config = ConfigDict(extra="allow")
    confidence: float = opt(0.95, "the confidence interval's level", gt=0, lt=1)
    n_resamples: int = opt(10000, "bootstrap resamples", ge=100)
    seed: int = opt(0, "the bootstrap's random seed", ge=0)


class Tables(Section):
    model_config = ConfigDict(extra="allow")
    paired: Paired = opt(Paired(), "paired comparisons")
    out: OutDir = opt("results/tables", "the output folder")
    _dirs = field_validator("out")(lambda v: _out_dir(v))


class OutputFolder(Section):
    model_config = ConfigDict(extra="allow")
    out: OutDir = opt(None, "the output folder")
    _dirs = field_validator("out")(lambda v: _out_dir(v))


class Visualize(Section):
    model_config = ConfigDict(extra="allow")
    num_images: int = opt(8, "images of a split", ge=1)


# ---------------------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One invalid setting: ``key=value: what is wrong, what is allowed, how to fix it``."""

    key: str
    value: Any
    message: str

    def __str__(self) -> str:
        return f"{self.key}={show(self.value)}: {self.message}"


def show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return repr(v)
    return str(v).lower() if isinstance(v, bool) else str(v)


def _field(model: type[BaseModel], loc: tuple) -> Any:
    """The FieldInfo at ``loc`` (None when it is not a declared field); in a discriminated union (``peft``)
    the part after the section is the choice's tag (``peft.adapter.dim``)."""
    models = _models_at(model, loc[:-1]) if loc else []
    fields = models[0].model_fields if models else {}
    return next((f for n, f in fields.items() if loc[-1] in (n, f.alias)), None)


def _models_at(model: type[BaseModel], loc: tuple) -> list[type[BaseModel]]:
    """The section class(es) at ``loc`` (a discriminated union's tag picks its choice)."""
    models: list[Any] = [model]
    for part in loc:
        if len(models) > 1:
            chosen = [m for m in models if getattr(m.model_fields.get("name"), "default", None) == part]
            if chosen:
                models = chosen
                continue
        info = next((f for n, f in getattr(models[0], "model_fields", {}).items() if part in (n, f.alias)), None)
        if info is None:
            return []
        ann = info.annotation
        models = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
    return [m for m in models if m is not None]


def show_choice(loc: tuple) -> str:
    """``peft=<choice>`` of an error location in the ``peft`` union (``("peft", "prefix", "dropout")``)."""
    return f"peft={loc[1]}" if len(loc) > 2 else "peft"


_OPS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _bounds(meta: Any) -> dict[str, Any]:
    """The bounds among pydantic's metadata (annotated_types' ``Ge``, ``Gt``, ...; a nested ``Field``'s)."""
    return {a: getattr(x, a) for m in meta for x in getattr(m, "metadata", [m]) for a in _OPS
            if type(x).__name__ == a.capitalize()}


def bounds_of(model: type[BaseModel], name: str) -> dict[str, Any]:
    """The declared bounds of ``model``'s field ``name`` (``{"ge": 1}``), to declare another field alike."""
    return _bounds(model.model_fields[name].metadata)


def rule(info: Any) -> str:
    """What a declared field allows, in words (``null (the whole split) or a whole number >= 1``)."""
    ann = str(info.annotation)
    kind = ("a whole number" if "int" in ann and "float" not in ann else "a finite number" if "float" in ann
            else "true or false" if "bool" in ann else "a string" if "str" in ann else "a valid value")
    bounds = " and ".join(f"{_OPS[a]} {v:{'g' if isinstance(v, float) else ''}}"
                          for a, v in _bounds(info.metadata).items())
    text = kind + (" " + bounds if bounds else "")
    null = (info.json_schema_extra or {}).get("null")
    return f"null ({null}) or {text}" if null else text


def problems(cfg: Any, model: type[BaseModel], prefix: str = "") -> list[Problem]:
    """Every problem of ``cfg`` (a plain dict or a DictConfig, resolved) against ``model``, one per key."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    try:
        model.model_validate(data)
        return []
    except ValidationError as e:
        errors = e.errors(include_url=False)
    out: dict[str, Problem] = {}
    for err in errors:
        full = tuple(str(x) for x in err["loc"])
        loc = (full[0], *full[2:]) if len(full) > 1 and full[0] == "peft" else full  # peft.lora.dropout: peft.dropout
        key = prefix + ".".join(loc)
        if key in out:
            continue
        info = _field(model, full)
        if err["type"] == "value_error":  # a validator's own message
            message = err["msg"].removeprefix("Value error, ")
        elif err["type"] == "literal_error":
            what = (info.json_schema_extra or {}).get("what") if info is not None else None
            message = (f"unknown {what or loc[-1]}; valid choices: "
                       + err["ctx"]["expected"].replace("'", "").replace(" or ", ", "))
        elif err["type"] == "extra_forbidden":  # a key the section (for peft: the chosen class) does not have
            owners = _models_at(model, full[:-1])
            valid = ", ".join(owners[0].model_fields) if len(owners) == 1 else "see --help"
            message = f"unknown setting{' of ' + show_choice(full) if loc[0] == 'peft' else ''}; valid keys: {valid}"
        elif err["type"] == "union_tag_invalid":
            message = f"unknown {loc[-1]}; valid choices: {err['ctx']['expected_tags'].replace(chr(39), '')}"
        elif info is not None:
            help_ = f" ({info.description})" if info.description else ""
            message = f"must be {rule(info)}{help_}; set e.g. {key}={show(info.default)}"
        else:
            message = err["msg"]
        out[key] = Problem(key, err.get("input"), message)
    return list(out.values())


def check(cfg: Any, model: type[BaseModel], what: str, more: list[Problem] = ()) -> None:
    """Raise one :class:`~pyra_bench.errors.ConfigCheckError` listing ``cfg``'s problems (and ``more``)."""
    from .errors import ConfigCheckError

    found = problems(cfg, model)
    found += [p for p in more if all(p.key != q.key for q in found)]
    if found:
        raise ConfigCheckError(what, found)


# ---------------------------------------------------------------------------------------------------------
# A component's options (a method's ``method.kwargs``, LoRA's): declared as fields, checked one at a time
# ---------------------------------------------------------------------------------------------------------
Int = Annotated[int, BeforeValidator(lambda v: int(v) if isinstance(v, float) and v.is_integer() else v)]


def Items(item: Any, **bounds: Any) -> Any:  # noqa: N802
    """A non-empty list of ``item`` within ``bounds`` (``ge``, ``gt``, ``le``, ``lt``)."""
    return Annotated[list[Annotated[item, Field(**bounds)]], Field(min_length=1)]


def _interval(meta: Any) -> str:
    b = _bounds(meta)
    lo, hi = b.get("ge", b.get("gt")), b.get("le", b.get("lt"))
    if lo is not None and hi is not None:
        return f" in {'(' if 'gt' in b else '['}{lo:g}, {hi:g}{')' if 'lt' in b else ']'}"
    return f" {'>' if 'gt' in b else '>='} {lo:g}" if lo is not None else \
        f" {'<' if 'lt' in b else '<='} {hi:g}" if hi is not None else ""


def option_rule(ann: Any, meta: Any = ()) -> str:
    """What an option's declaration allows, in words (``a number in (0, 1]``, ``an integer >= 1 or null``)."""
    args = get_args(ann)
    if get_origin(ann) is Annotated:
        return option_rule(args[0], [*meta, *args[1:]])
    if type(None) in args:
        return option_rule(next(a for a in args if a is not type(None)), meta) + " or null"
    if get_origin(ann) is Literal:
        return f"one of the valid choices: {', '.join(args)}"
    if get_origin(ann) is list:
        item = option_rule(args[0]).replace("an integer", "integers").replace("a number", "numbers")
        return f"a non-empty list of {item}"
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(ann, "a valid value")
    return kind + (_interval(meta) if ann in (int, float) else "")


class Options(BaseModel):
    """A component's options (a method's: ``method.kwargs.*``), each one ``opt(default, help, ...)`` line;
    :meth:`check` validates given values and raises the first problem, naming the component, the option, its
    value, what is allowed and the key that fixes it. A wrong type (``"abc"`` for a number, ``3.7`` for an
    integer, a number for a name) is an :class:`~pyra_bench.errors.OptionTypeError`, a value out of range or
    not among the choices a :class:`~pyra_bench.errors.ConfigError`. The docstring's first line describes
    the component (``--help``)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    owner: ClassVar[str] = "method"
    prefix: ClassVar[str | None] = "method.kwargs"

    @classmethod
    def check(cls, values: dict[str, Any]) -> Options:
        from omegaconf import OmegaConf

        data = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else list(v) if isinstance(v, tuple) else v
                for k, v in values.items()}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
        name, value, i = str(err["loc"][0]), data[str(err["loc"][0])], (err["loc"][1:] or [None])[0]
        info = cls.model_fields[name]
        rule = (info.json_schema_extra or {}).get("rule") or option_rule(info.annotation, info.metadata)
        kind = err["type"]
        if kind.endswith("_type") or kind == "literal_error" and not isinstance(err["input"], str):
            cls.wrong_type(name if i is None else f"{name}[{i}]", err["input"], rule, name)
        why = "empty" if kind == "too_short" else f"entry {i} is {err['input']!r}" if i is not None else ""
        cls.fail(name, value, rule, why=why)

    @classmethod
    def _fix(cls, name: str) -> str:
        info = cls.model_fields.get(name)
        key = (info and (info.json_schema_extra or {}).get("key")) or (f"{cls.prefix}.{name}" if cls.prefix else None)
        return f"; set {key} to such a value" if key else ""

    @classmethod
    def fail(cls, name: str, value: Any, rule: str, why: str = "") -> NoReturn:
        """Raise :class:`~pyra_bench.errors.ConfigError`: ``value`` has the right type, but ``rule`` says what
        is allowed."""
        from .errors import ConfigError

        raise ConfigError(f"{cls.owner}: {name}={value!r} is not allowed{f' ({why})' if why else ''}: it must be "
                          f"{rule}{cls._fix(name)}")

    @classmethod
    def wrong_type(cls, name: str, value: Any, rule: str, option: str | None = None) -> NoReturn:
        """Raise :class:`~pyra_bench.errors.OptionTypeError`: ``value`` is not of the kind ``rule`` says."""
        from .errors import OptionTypeError

        raise OptionTypeError(f"{cls.owner}: {name} must be {rule}, got {value!r} ({type(value).__name__})"
                              + cls._fix(option or name))


# ---------------------------------------------------------------------------------------------------------
# Identity: what can change a result, and the defaults of an older record
# ---------------------------------------------------------------------------------------------------------
def _walk(model: type[BaseModel], prefix: str = "", execution: bool = False):
    """(flattened key, FieldInfo, execution) of every field, sections included (peft: each choice's)."""
    for name, info in model.model_fields.items():
        key = prefix + (info.alias or name)
        ex = execution or bool((info.json_schema_extra or {}).get("execution"))
        yield key, info, ex
        subs = [a for a in getattr(info.annotation, "__args__", (info.annotation,))
                if isinstance(a, type) and issubclass(a, BaseModel)]
        for sub in PEFT_CHOICES if key == "peft" else subs:
            yield from _walk(sub, key + ".", ex)


@functools.cache
def execution_keys() -> frozenset[str]:
    """The flattened keys of :class:`Run` that cannot change a result (sections: everything under them)."""
    return frozenset(k for k, _, ex in _walk(Run) if ex)


@functools.cache
def defaults() -> dict[str, Any]:
    """The default of every result-changing setting of :class:`Run`, by flattened key: what an older record
    that lacks a key (a setting added since) is compared with."""
    return {k: i.default for k, i, ex in _walk(Run) if not ex and not isinstance(i.default, BaseModel)}


#: Callbacks that cannot change a result (any other ``callbacks.<name>`` entry is part of a run's identity).
EXECUTION_CALLBACKS = frozenset({
    "pyra_bench.console.FitLogInterval", "pyra_bench.console.EpochLogger",
    "lightning.pytorch.callbacks.LearningRateMonitor", "lightning.pytorch.callbacks.RichProgressBar",
    "lightning.pytorch.callbacks.TQDMProgressBar", "lightning.pytorch.callbacks.ModelSummary",
    "lightning.pytorch.callbacks.RichModelSummary", "lightning.pytorch.callbacks.DeviceStatsMonitor",
    "lightning.pytorch.callbacks.Timer",
})
