"""Config -> objects: the data module, the model, the Lightning trainer with its callbacks and loggers.

The ``trainer`` config group holds two kinds of keys: the training recipe (:data:`RECIPE_KEYS`: epochs,
learning rates, batch sizes, evaluation schedule ...), read by pyra_bench, and everything else, which
is passed to the Trainer class its ``_target_`` names (``lightning.pytorch.Trainer``) as it is, through
``hydra.utils.instantiate`` (``+trainer.gradient_clip_val=1.0`` reaches the Trainer; a misspelt option is
refused by :func:`check_trainer_options` before anything is built).

:func:`make_model` is the one way from a config to a model: ``train``, ``bench``, the sweep's estimate and
the Python API all build through it.
``callbacks`` and ``logger`` are dicts of ``_target_`` entries, instantiated as lightning-hydra-template
does; an entry set to null (``logger.wandb=null``) or with ``enabled: false`` is left out.

Importing this module registers the OmegaConf resolvers the configs use (``first``, ``gpu_count``,
``wandb_id``, ``short_hash``), so every entry point that composes a config imports it first.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, InputFileNotFoundError
from .identity import PROTOCOLS, short_hash, wandb_id
from .schema import RECIPE_FIELDS

log = logging.getLogger("pyra_bench")

#: ``trainer`` keys that are pyra_bench's recipe, not Lightning Trainer options (the fields of
#: :class:`pyra_bench.schema.Trainer` that are not Lightning's; ``_target_`` chooses the Trainer class).
RECIPE_KEYS = frozenset(RECIPE_FIELDS) - {"_target_"}
#: The Trainer class when ``trainer._target_`` is not set.
DEFAULT_TRAINER = "lightning.pytorch.Trainer"
#: Trainer options pyra_bench sets itself, with the recipe key to use instead.
FRAMEWORK_TRAINER_KEYS = {
    "max_epochs": "trainer.epochs", "min_epochs": "trainer.epochs", "max_steps": "trainer.max_steps_per_epoch",
    "callbacks": "callbacks.<name>._target_", "logger": "logger.<name>._target_",
    "limit_train_batches": "trainer.max_steps_per_epoch", "limit_val_batches": "trainer.evaluation",
    "check_val_every_n_epoch": "trainer.eval_every", "val_check_interval": "trainer.eval_every",
    "num_sanity_val_steps": None, "default_root_dir": "run_dir", "enable_checkpointing": "trainer.checkpoint_every",
}


def _first(*values):
    """The first value that is not null (``${first:${budget},high}``)."""
    return next((v for v in values if v not in (None, "None", "null")), None)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


OmegaConf.register_new_resolver("first", _first, replace=True)
OmegaConf.register_new_resolver("gpu_count", _gpu_count, replace=True)
OmegaConf.register_new_resolver("wandb_id", wandb_id, replace=True)
OmegaConf.register_new_resolver("short_hash", short_hash, replace=True)


def _register_tracking_resolvers() -> None:
    from .tracking import register_resolvers

    register_resolvers()


_register_tracking_resolvers()


# ---------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------
def trainer_options(cfg: DictConfig) -> dict[str, Any]:
    """The ``trainer`` keys that are Trainer options (everything but :data:`RECIPE_KEYS` and ``_target_``)."""
    t = OmegaConf.to_container(cfg.trainer, resolve=True)
    return {k: v for k, v in t.items() if k not in RECIPE_KEYS and k != "_target_"}


def trainer_target(cfg: DictConfig) -> str:
    """The Trainer class ``trainer._target_`` names (:data:`DEFAULT_TRAINER` when it is not set)."""
    return str(cfg.trainer.get("_target_") or DEFAULT_TRAINER)


def _trainer_class(cfg: DictConfig) -> type:
    from hydra.utils import get_class

    target = trainer_target(cfg)
    try:
        return get_class(target)
    except Exception as e:  # noqa: BLE001 - a target that does not import is a config error
        raise ConfigError(f"trainer._target_={target!r} is not a class that imports (e.g. {DEFAULT_TRAINER}): "
                          f"{e}") from None


def check_trainer_options(cfg: DictConfig) -> None:
    """Refuse Trainer options that the Trainer class (``trainer._target_``) does not take or that pyra_bench
    sets itself."""
    import lightning as L

    cls = _trainer_class(cfg)
    params = inspect.signature(cls.__init__).parameters
    valid = set(params) - {"self"}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):  # a subclass passing **kwargs on
        valid |= set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    problems = []
    for key in trainer_options(cfg):
        if key in FRAMEWORK_TRAINER_KEYS:
            use = FRAMEWORK_TRAINER_KEYS[key]
            problems.append(f"trainer.{key} is set by pyra_bench" + (f"; use {use}" if use else ""))
        elif key not in valid:
            close = difflib.get_close_matches(key, sorted(valid | RECIPE_KEYS), n=3)
            problems.append(f"trainer.{key} is neither a {cls.__qualname__} option nor a recipe key"
                            + (f" (did you mean {', '.join(close)}?)" if close else ""))
    if problems:
        raise ConfigError("bad trainer option(s):\n  " + "\n  ".join(problems)
                          + f"\n  Recipe keys: {', '.join(sorted(RECIPE_KEYS))}; any other key "
                            f"must be an argument of {trainer_target(cfg)} (trainer._target_).")


def _entries(group: Any) -> list[tuple[str, DictConfig]]:
    if group is None:
        return []
    out = []
    for name, entry in group.items():
        if entry is None or (OmegaConf.is_dict(entry) and entry.get("enabled", True) is False):
            continue
        if not OmegaConf.is_dict(entry) or "_target_" not in entry:
            raise ConfigError(f"{name}: expected a config with _target_ (a class to instantiate), got {entry!r}")
        out.append((str(name), entry))
    return out


def _instantiate(name: str, entry: DictConfig) -> Any:
    from hydra.utils import instantiate

    own = ("enabled", "execution")  # pyra_bench's keys of an entry (whether it is used; whether it changes results)
    entry = OmegaConf.masked_copy(entry, [k for k in entry if k not in own]) if any(k in entry for k in own) else entry
    try:
        return instantiate(entry, _convert_="partial")
    except Exception as e:  # noqa: BLE001 - a config that does not construct is a config error
        raise ConfigError(f"could not build {name} ({entry.get('_target_')}): {e}") from e


def make_callbacks(cfg: DictConfig, with_loggers: bool = True) -> list:
    """The user-configured callbacks (``callbacks.<name>: {_target_: ...}``); without loggers, a
    learning-rate monitor (which needs one) is left out."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    out = [_instantiate(f"callbacks.{n}", e) for n, e in _entries(cfg.get("callbacks"))]
    return out if with_loggers else [c for c in out if not isinstance(c, LearningRateMonitor)]


def make_loggers(cfg: DictConfig) -> list:
    """The configured loggers (``logger.<name>: {_target_: ...}``); they may use ``${run_dir}`` and
    ``${run_id}``, which the run sets before building them."""
    return [_instantiate(f"logger.{n}", e) for n, e in _entries(cfg.get("logger"))]


def make_trainer(cfg: DictConfig, *, max_epochs: int, callbacks: list, loggers: list, run_dir: Path):
    """The Trainer for one stage, instantiated from ``trainer``'s ``_target_`` with the configured options
    (the recipe keys kept apart) plus what pyra_bench owns (epochs, step cap, callbacks, loggers; Lightning's
    validation loop off -- the module evaluates -- and checkpoints only by
    :class:`~pyra_bench.lifecycle.EpochCheckpoint` saves; Lightning's signal handling and SLURM requeue off)."""
    from hydra.utils import instantiate
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from .console import progress_bar_enabled
    from .lifecycle import disable_lightning_signals

    opts = trainer_options(cfg)
    plugins = list(opts.pop("plugins", None) or [])
    if SLURMEnvironment.detect() and not any(isinstance(p, SLURMEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))  # submitit requeues; one mechanism, not two
    opts.setdefault("enable_model_summary", False)
    opts.setdefault("enable_progress_bar", progress_bar_enabled())
    # The module evaluates itself (AdaptationModule.evaluate); Lightning's validation loop is off by design.
    warnings.filterwarnings("ignore", message=".*val_dataloader.* but have no `validation_step`")
    _trainer_class(cfg)  # a target that does not import: one message naming it
    try:
        trainer_cls = instantiate({"_target_": trainer_target(cfg), **opts}, _partial_=True, _convert_="all")
    except Exception as e:  # noqa: BLE001 - options that do not instantiate are a config error
        raise ConfigError(f"the trainer options do not construct {trainer_target(cfg)}: {e}") from e
    try:
        trainer = trainer_cls(
            plugins=plugins or None, max_epochs=max_epochs,
            limit_train_batches=cfg.trainer.get("max_steps_per_epoch"), limit_val_batches=0,
            num_sanity_val_steps=0, enable_checkpointing=True, logger=loggers or False, callbacks=callbacks,
            default_root_dir=str(run_dir),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"the trainer options do not construct {trainer_target(cfg)}: {e}") from e
    disable_lightning_signals(trainer)
    return trainer


# ---------------------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------------------
def make_datamodule(cfg: DictConfig, task: str | None = None):
    """The data module of the run's task (or of another ``task``: a stage trained on other data)."""
    from .data import VTABDataModule, get_task
    from .data.tasks import task_spec_from_config

    t, data = cfg.trainer, cfg.get("data") or {}
    train_split, eval_split = PROTOCOLS[cfg.get("protocol", "final")]
    if task in (None, cfg.task.name):  # the run's own task, as its config describes it
        task, source = task_spec_from_config(OmegaConf.to_container(cfg.task, resolve=True)), cfg.task.source
    else:
        source = "embedded" if get_task(task).source == "embedded" else "folder"
    return VTABDataModule(
        task=task, data_root=cfg.data_root, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size,
        num_workers=t.num_workers, image_size=cfg.backbone.image_size, normalization=cfg.backbone.normalization,
        source=source, seed=cfg.seed, train_split=train_split, eval_split=eval_split,
        cache=data.get("cache"), cache_dir=data.get("cache_dir"), cache_max_gb=data.get("cache_max_gb"),
        link_root=data.get("link_root"),
    )


def resolve_weights(bcfg: DictConfig, fetch_demo: bool = True) -> tuple[bool, str | None]:
    """-> (pretrained_from_hub, checkpoint_path). A missing local file fails here; ``demo`` pre-trains (and
    caches) the demo backbone unless ``fetch_demo`` is false."""
    w = str(bcfg.weights) if bcfg.get("weights") is not None else "none"
    if w == "hub":
        return True, None
    if w == "none":
        return False, None
    if w == "demo":
        if not fetch_demo:
            return False, None
        from .demo_pretrain import ensure_demo_backbone

        return False, str(ensure_demo_backbone())
    path = Path(w).expanduser()
    if not path.is_file():
        raise InputFileNotFoundError(
            f"backbone weights file not found: {path}\n  Set backbone.weights=/path/to/file (.npz of the original "
            f"ViT release, .pth or .safetensors), backbone.weights=hub to download through timm, or set "
            f"PYRA_WEIGHTS to the folder holding it.")
    return False, str(path)


def method_kwargs(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.method.kwargs, resolve=True) if cfg.method.get("kwargs") else {}


def make_method(cfg: DictConfig):
    """The method object of the run config (a registered name or a ``_target_`` class)."""
    from .identity import method_class
    from .registry import UnknownChoiceError

    cls = method_class(cfg.method)
    try:
        return cls(schedule=cfg.compression, **method_kwargs(cfg))
    except UnknownChoiceError:
        raise
    except TypeError as e:
        raise ConfigError(f"method {cfg.method.name!r}: {e}") from e


def make_model(cfg: DictConfig, num_classes: int, pretrained: bool, checkpoint: str | None,
               abstract: bool = False, timing: Any = None):
    """The frozen backbone with LoRA and the method applied (:func:`pyra_bench.models.build_model`), from a
    run's config or any config with ``backbone``, ``method`` and ``compression`` (``bench``'s): every backbone
    config (registered, with field overrides, or config-only) and method config (built-in or plug-in).

    A config without a ``trainer`` recipe (``bench``) builds the inference-time model: no LoRA (or adapter /
    prompt) dropout, no drop-path, LoRA initialised as ``standard``. ``peft``: the choice of ``cfg.peft``
    (:mod:`pyra_bench.models.peft`; LoRA, the default, unless ``peft.name`` says otherwise). ``timing``: where and how speed targets (``speedup:<x>``)
    are timed, ``{device, batch_size, dtype}``; default: the run's (``throughput.*`` on the run's device).

    ``abstract``: for checks -- the model on the meta device (structure and shapes, no memory, no weight
    initialisation: ViT-B/16's takes seconds), unless the method times real models while it is applied
    (:attr:`pyra_bench.methods.Method.measures_at_build`)."""
    import contextlib

    import torch

    from .models import build_model
    from .models.backbones import backbone_spec_from_config
    from .models.variants import merge_variants

    t, peft = cfg.get("trainer") or {}, cfg.get("peft") or {}
    tp = timing if timing is not None else {**(cfg.get("throughput") or {}), "device": run_device(cfg)}
    method = make_method(cfg)
    meta = abstract and not method.measures_at_build
    peft = OmegaConf.to_container(peft, resolve=True) if OmegaConf.is_config(peft) else dict(peft)
    choice = None  # LoRA (the default) from its own arguments, as before the other choices existed
    if peft.get("name", "lora") != "lora":
        choice = {**peft, **({"dropout": 0.0} if not t and "dropout" in peft else {})}
    with torch.device("meta") if meta else contextlib.nullcontext():
        return build_model(
            backbone_spec_from_config(OmegaConf.to_container(cfg.backbone, resolve=True)), num_classes, method,
            lora_rank=peft.get("rank"), lora_alpha=peft.get("alpha"),
            lora_dropout=peft.get("dropout", 0.1) if t else 0.0, lora_init=peft.get("init", "standard"),
            peft=choice, pretrained=pretrained, checkpoint=checkpoint, drop_path_rate=t.get("drop_path", 0.0),
            prop_attn=bool(cfg.backbone.get("prop_attn", True)), device=str(tp.get("device", "cpu")),
            **merge_variants(cfg.backbone),
            bench_batch_size=tp.get("batch_size"), bench_dtype=str(tp.get("dtype", "float32")),
        )


def run_device(cfg: DictConfig) -> str:
    """Where the run computes (``cuda`` when it trains on a GPU, else ``cpu``): speed targets are timed there."""
    try:
        import torch

        accel = str((cfg.get("trainer") or {}).get("accelerator", "auto"))
        return "cuda" if torch.cuda.is_available() and accel in ("auto", "gpu", "cuda") else "cpu"
    except Exception:  # noqa: BLE001
        return "cpu"
