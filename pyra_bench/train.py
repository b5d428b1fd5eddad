"""``python -m pyra_bench.train``: train and evaluate one run, write its run record.

Everything is composed by Hydra from ``conf/train.yaml`` (``--help`` lists the groups). A run is:

0. skip the run if its record exists (and was made with the same settings, :func:`check_record_matches`);
1. validate the inputs (task, data folder and images, weights file, schedule, stage options) before
   anything expensive, and before the run folder is created;
2. build the frozen backbone with LoRA and the method (:func:`pyra_bench.models.build_model`);
3. run the method's stages, each a Lightning ``fit`` (resumable from ``<run_dir>/ckpt/<stage>/last.ckpt``;
   a finished stage is saved to ``<run_dir>/stages/<stage>.pt`` and skipped on re-run);
4. evaluate top-1 on the protocol's split (``final``: test; ``tuning``: val200) every
   ``trainer.eval_every`` epochs and after the last, measure the LoRA-merged inference model (params,
   MACs, optionally throughput), export it (:mod:`pyra_bench.export`) and write the run record atomically.

The run id (record, run folder, W&B id) is :func:`run_id_of`. A failure other than bad input is retried
in place ``retries`` times (:func:`train_with_retries`); in a multirun a failed run is recorded under
``<results_dir>/failed/`` and the sweep goes on.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, InputError, InputFileNotFoundError, exit_on_input_error
from .records import atomic_write_json, record_id, write_record

log = logging.getLogger("pyra_bench.train")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


PROTOCOLS = {  # protocol -> (training split, evaluated split)
    "final": ("train800val200", "test"),  # the VTAB-1k protocol: what the tables report
    "tuning": ("train800", "val200"),     # hyperparameter selection, never touching the test split
}


def _null(v: Any) -> bool:
    return v in (None, "None", "null", "")


def _run_id(task, backbone, method, compression, seed, variant=None, protocol="final", tag=None) -> str:
    """The run's identity (record file, run folder, W&B id): task, backbone, method[-variant], operating
    point, seed, plus ``__tune`` for the tuning protocol and ``__<run_tag>`` when one is set."""
    variant = None if _null(variant) or variant == "full" else variant
    rid = record_id(str(task), str(backbone), str(method), _compression_str(compression), int(seed), variant)
    if not _null(protocol) and protocol != "final":
        rid += f"__{'tune' if protocol == 'tuning' else protocol}"
    if not _null(tag):
        rid += "__" + "".join(c if c.isalnum() or c in "-_." else "-" for c in str(tag))
    return rid


def run_id_of(cfg: DictConfig) -> str:
    """:func:`_run_id` of a composed run config."""
    return _run_id(cfg.task.name, cfg.backbone.name, cfg.method.name, cfg.compression, cfg.seed,
                   OmegaConf.select(cfg, "method.kwargs.variant"), cfg.get("protocol", "final"), cfg.get("run_tag"))


#: Config keys that do not change what a run computes (where and how fast it runs); everything else in
#: task / backbone / method / trainer / compression / seed / protocol must match an existing record.
EXECUTION_KEYS = {"trainer.num_workers", "trainer.devices", "trainer.strategy", "trainer.accelerator",
                  "trainer.num_nodes", "trainer.cpu_threads", "trainer.eval_batch_size", "backbone.weights"}


def _identity(config: dict) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            flat[prefix] = v

    for key in ("task", "backbone", "method", "trainer", "compression", "seed", "protocol"):
        walk(key, config.get(key))
    return {k: v for k, v in flat.items() if k not in EXECUTION_KEYS}


def _settings_diff(cfg: DictConfig, old_config: dict) -> list[tuple[str, Any, Any]]:
    """(key, old value, current value) for every identity setting (:func:`_identity`) that differs. Keys
    only one side has (a setting added or removed since ``old_config`` was written) are not compared."""
    now, before = _identity(OmegaConf.to_container(cfg, resolve=True)), _identity(old_config)
    return [(k, before[k], now[k]) for k in sorted(now.keys() & before.keys()) if now[k] != before[k]]


def check_record_matches(cfg: DictConfig, record_path: Path) -> None:
    """A run is skipped when its record exists; refuse to skip when that record was made with other
    settings (e.g. a learning-rate sweep without ``run_tag``), which would silently report the wrong run."""
    from .records import read_record

    try:
        old = read_record(record_path).get("config") or {}
    except (OSError, ValueError):
        return
    diff = _settings_diff(cfg, old)
    if diff:
        shown = "; ".join(f"{k}: {before!r} in the record, {now!r} now" for k, before, now in diff[:6])
        raise ConfigError(f"a record for this run id exists with different settings ({record_path}): {shown}"
                          f"{' ...' if len(diff) > 6 else ''}\n  Set run_tag=<name> to keep both runs, or force=true "
                          f"to replace the record.")


def _compression_str(c: Any) -> str:
    if isinstance(c, (list, tuple)) or OmegaConf.is_list(c):
        return "list-" + "-".join(str(v) for v in c)
    if OmegaConf.is_dict(c) or isinstance(c, dict):
        return "tome-" + "-".join(f"{k}{v}" for k, v in dict(c).items())
    return str(c).replace(":", "-").replace(",", "_")


def _first(*values):
    """The first value that is not null (``${first:${budget},high}``)."""
    return next((v for v in values if v not in (None, "None", "null")), None)


OmegaConf.register_new_resolver("run_id", _run_id, replace=True)
OmegaConf.register_new_resolver("first", _first, replace=True)


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def software_versions() -> dict[str, str]:
    import lightning
    import timm
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "lightning": lightning.__version__}


# ---------------------------------------------------------------------------------------------------------
# Input validation and construction
# ---------------------------------------------------------------------------------------------------------
def resolve_weights(bcfg: DictConfig) -> tuple[bool, str | None]:
    """-> (pretrained_from_hub, checkpoint_path). Fails early on a missing local file."""
    w = str(bcfg.weights) if bcfg.get("weights") is not None else "none"
    if w == "hub":
        return True, None
    if w == "none":
        log.warning("backbone.weights=none: the frozen backbone is RANDOMLY initialised (smoke test only)")
        return False, None
    if w == "demo":
        from .demo_pretrain import ensure_demo_backbone

        return False, str(ensure_demo_backbone())
    path = Path(w).expanduser()
    if not path.is_file():
        raise InputFileNotFoundError(
            f"backbone weights file not found: {path}\n  Set backbone.weights=/path/to/file (.npz of the original "
            f"ViT release, .pth or .safetensors), backbone.weights=hub to download through timm, or set "
            f"PYRA_WEIGHTS to the folder holding it.")
    return False, str(path)


def make_datamodule(cfg: DictConfig, task: str | None = None):
    from .data import VTABDataModule

    t = cfg.trainer
    train_split, eval_split = PROTOCOLS[cfg.get("protocol", "final")]
    return VTABDataModule(
        task=task or cfg.task.name, data_root=cfg.data_root, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size,
        num_workers=t.num_workers, image_size=cfg.backbone.image_size, normalization=cfg.backbone.normalization,
        source=cfg.task.source if task in (None, cfg.task.name) else _default_source(task), seed=cfg.seed,
        train_split=train_split, eval_split=eval_split,
    )


def _default_source(task: str) -> str:
    """Where another task's data comes from (a stage's ``task``): the embedded demo data or a prepared folder."""
    from .data import get_task

    return "embedded" if get_task(task).source == "embedded" else "folder"


def make_model(cfg: DictConfig, num_classes: int, pretrained: bool, checkpoint: str | None):
    from .models import build_model

    t = cfg.trainer
    return build_model(
        cfg.backbone.name, num_classes, cfg.method.name, cfg.compression,
        lora_rank=cfg.backbone.get("lora_rank"), lora_dropout=t.lora_dropout, lora_init=t.lora_init,
        pretrained=pretrained, checkpoint=checkpoint, drop_path_rate=t.drop_path,
        method_kwargs=OmegaConf.to_container(cfg.method.kwargs, resolve=True) if cfg.method.get("kwargs") else {},
    )


def make_wandb_logger(cfg: DictConfig, run_dir: Path, run_id: str):
    """One W&B run per pyra_bench run (shared by its stages), offline unless ``logger.wandb.mode=online``.
    Its id is derived from the run id, so a resumed or retried run continues the same W&B run."""
    wb = cfg.logger.get("wandb") or {}
    if not wb.get("enabled", False):
        return None
    import hashlib

    from lightning.pytorch.loggers import WandbLogger

    mode = wb.get("mode", "offline")
    return WandbLogger(project=wb.get("project", "pyra_bench"), entity=wb.get("entity"), name=run_id,
                       id=hashlib.sha1(run_id.encode()).hexdigest()[:16], resume="allow", save_dir=str(run_dir),
                       tags=list(wb.get("tags", [])), offline=mode == "offline", mode=mode,
                       config=OmegaConf.to_container(cfg, resolve=True))


def make_loggers(cfg: DictConfig, run_dir: Path, run_id: str, wandb_logger=None) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers = []
    if cfg.logger.get("csv", True):
        loggers.append(CSVLogger(save_dir=str(run_dir), name="logs"))
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    return loggers


def _finish_wandb(wandb_logger) -> None:
    """Close the W&B run (each run of a Hydra multirun must finish its own, wandb#1314)."""
    if wandb_logger is not None:
        import wandb

        if wandb.run is not None:
            wandb.finish()


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def train(cfg: DictConfig, fresh: bool | None = None) -> dict[str, Any]:
    """One run: validate, train every stage of the method, measure, write the record (see module doc).

    ``fresh`` (default: ``cfg.force``) discards the run folder's checkpoints and finished stages first, so
    ``force=true`` really re-trains; otherwise an interrupted run resumes from them."""
    wandb_logger: list = []
    try:
        return _train(cfg, wandb_logger, bool(cfg.get("force", False)) if fresh is None else fresh)
    finally:
        _finish_wandb(wandb_logger[0] if wandb_logger else None)


RUN_STATE = ("ckpt", "stages", "inference_model.pt")  # what a fresh start removes from a run folder


def _prepare_run_dir(cfg: DictConfig, run_dir: Path, fresh: bool) -> None:
    """Create the run folder; a fresh start clears its training state, a resume warns when the folder was
    started with other settings (e.g. more epochs is a legitimate extension, another lr is probably not)."""
    import shutil

    if fresh:
        for name in RUN_STATE:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    elif (run_dir / "config.json").is_file() and any((run_dir / n).exists() for n in RUN_STATE[:2]):
        import json

        diff = _settings_diff(cfg, json.loads((run_dir / "config.json").read_text()))
        if diff:
            log.warning("resuming %s, which was started with other settings (%s); force=true starts afresh",
                        run_dir, "; ".join(f"{k}: {before!r} -> {now!r}" for k, before, now in diff[:6]))
    run_dir.mkdir(parents=True, exist_ok=True)


def _train(cfg: DictConfig, wandb_holder: list, fresh: bool) -> dict[str, Any]:
    import lightning as L
    import torch

    from .lit import AdaptationModule, TrainingCost
    from .models import count_parameters

    variant = OmegaConf.select(cfg, "method.kwargs.variant")
    rid = run_id_of(cfg)
    protocol = cfg.get("protocol", "final")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; valid choices: {', '.join(PROTOCOLS)}")
    results_dir, run_dir = Path(cfg.results_dir), Path(cfg.run_dir)
    record_path = results_dir / f"{rid}.json"
    if record_path.exists() and not cfg.get("force", False):
        check_record_matches(cfg, record_path)
        print(f"[pyra_bench] {rid}: record exists ({record_path}); skipping (force=true to re-run)")
        return {"run_id": rid, "status": "skipped", "path": str(record_path)}

    t_start = time.time()
    if cfg.trainer.get("cpu_threads"):
        torch.set_num_threads(int(cfg.trainer.cpu_threads))
    # 1. validate first, cheapest checks first: data folders and lists, weights file, model/schedule, stage
    #    options, then every image (raises before any training, and before the run folder is made)
    dm = make_datamodule(cfg)
    if cfg.backbone.get("weights") in ("demo", "hub"):  # pre-training (demo) or a download (hub) may come
        make_model(cfg, dm.num_classes, False, None)      # first: check the method and schedule before that
    pretrained, checkpoint = resolve_weights(cfg.backbone)
    L.seed_everything(cfg.seed, workers=True)
    model = make_model(cfg, dm.num_classes, pretrained, checkpoint)
    method = model.pyra_method

    t = cfg.trainer
    optim = {"lr": t.lr, "weight_decay": t.weight_decay, "warmup_lr": t.warmup_lr, "min_lr": t.min_lr,
             "warmup_epochs": t.warmup_epochs, "method_lr": cfg.method.get("lr"),
             "method_weight_decay": cfg.method.get("weight_decay")}
    stages = method.stages()
    stage_data = {s.task: make_datamodule(cfg, s.task) for s in stages if s.task and s.task != cfg.task.name}
    stop_after, (init_index, init_path) = _check_chaining(cfg, method.name, [s.name for s in stages])
    if cfg.get("verify_images", True):  # the slowest check last: decode every image once (remembered)
        for d in (dm, *stage_data.values()):
            d.verify()
    _prepare_run_dir(cfg, run_dir, fresh)
    atomic_write_json(run_dir / "config.json", OmegaConf.to_container(cfg, resolve=True))
    history: dict[int, float] = {}
    eval_images: int | None = None  # images behind the last evaluation (the whole split, also under DDP)
    training_cost: dict[str, Any] = {}  # per trained stage: training throughput / peak memory (lit.TrainingCost)
    epoch_offset = 0
    for i, stage in enumerate(stages):
        stage_epochs = max(1, round(t.epochs * stage.epochs_fraction)) if stage.epochs_fraction > 0 else 0
        if i < init_index:  # covered by the init_from checkpoint of a later stage
            epoch_offset += stage_epochs
            continue
        done = run_dir / "stages" / f"{stage.name}.pt"
        source = init_path if i == init_index and not done.exists() else done
        if source.exists():
            saved = torch.load(source, map_location="cpu", weights_only=False)
            method.restore(model, saved["method_state"])
            model.load_state_dict(saved["model"])
            history.update(saved.get("eval_history", {}))
            if saved.get("training_cost"):
                training_cost[stage.name] = saved["training_cost"]
            print(f"[pyra_bench] stage {stage.name!r} already finished; restored from {source}")
            epoch_offset += stage_epochs
            if stage.name == stop_after and i < len(stages) - 1:
                return _stopped(rid, stage.name, run_dir)
            continue
        sdm = stage_data.get(stage.task, dm)
        method.on_stage_start(stage, model, sdm)
        if stage_epochs == 0:  # a structural step only (e.g. pruning), no training
            _save_stage(done, model, method, {})
            if stage.name == stop_after and i < len(stages) - 1:
                return _stopped(rid, stage.name, run_dir)
            continue
        module = AdaptationModule(model, dm.num_classes, optim, stage_epochs, epoch_offset,
                                  evaluate=stage.evaluate)
        ckpt_dir = run_dir / "ckpt" / stage.name
        last = ckpt_dir / "last.ckpt"
        from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

        cost = TrainingCost()
        callbacks = [ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0, every_n_epochs=1), cost]
        if not wandb_holder:
            wandb_holder.append(make_wandb_logger(cfg, run_dir, rid))
        loggers = make_loggers(cfg, run_dir, rid, wandb_holder[0])
        if loggers:
            callbacks.append(LearningRateMonitor(logging_interval="epoch"))
        trainer = L.Trainer(
            max_epochs=stage_epochs, accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
            num_nodes=t.num_nodes, precision=t.precision, deterministic=t.deterministic,
            check_val_every_n_epoch=t.eval_every if stage.evaluate else None,
            limit_val_batches=None if stage.evaluate else 0,
            limit_train_batches=t.max_steps_per_epoch, num_sanity_val_steps=0,
            logger=loggers or False, callbacks=callbacks, enable_model_summary=False,
            default_root_dir=str(run_dir),
        )
        print(f"[pyra_bench] {rid}: stage {i + 1}/{len(stages)} {stage.name!r}, {stage_epochs} epochs"
              + (f" (resuming from {last})" if last.exists() else ""))
        trainer.fit(module, datamodule=sdm, ckpt_path=str(last) if last.exists() else None)
        if stage.evaluate and (i == len(stages) - 1) and (epoch_offset + stage_epochs) not in module.eval_history:
            trainer.validate(module, datamodule=dm, verbose=False)
        history.update(module.eval_history)
        eval_images = module.eval_images if module.eval_images is not None else eval_images
        if (summary := cost.summary()) is not None:
            training_cost[stage.name] = summary
        if trainer.is_global_zero:
            _save_stage(done, model, method, module.eval_history, training_cost.get(stage.name))
        epoch_offset += stage_epochs
        if stage.name == stop_after and i < len(stages) - 1:
            return _stopped(rid, stage.name, run_dir)

    if int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0:
        return {"run_id": rid, "status": "worker"}

    # 2. measure the inference model (LoRA merged)
    model.eval()
    params = count_parameters(model, method)
    infer = method.inference_model(model).cpu().eval()
    flops = _flops(infer, cfg.backbone.image_size)
    throughput = None
    if cfg.get("measure_throughput", False):
        from .measure import default_batch_size, measure_throughput

        tp = cfg.get("throughput") or {}
        device = tp.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() and t.accelerator in ("auto", "gpu", "cuda") else "cpu"
        batch = tp.get("batch_size") or default_batch_size(device)
        throughput = measure_throughput(copy.deepcopy(infer), batch_size=int(batch), image_size=cfg.backbone.image_size,
                                        device=device, dtype=tp.get("dtype", "float32"),
                                        warmup_s=float(tp.get("warmup_s", 10.0)),
                                        duration_s=float(tp.get("duration_s", 10.0)))
    if cfg.get("export_inference_model", True):
        from .export import FILE_NAME, save_inference_model

        save_inference_model(run_dir / FILE_NAME, infer, method, cfg)

    from .data import get_task

    record = {
        "run_id": rid, "status": "completed", "task": cfg.task.name, "group": get_task(cfg.task.name).group,
        "backbone": cfg.backbone.name, "method": cfg.method.name, "variant": variant,
        "schedule": _compression_str(cfg.compression), "seed": int(cfg.seed), "data_format": dm.data_format,
        "protocol": protocol,
        "metrics": _metrics(history, eval_images, "val" if protocol == "tuning" else "test"),
        "params": params.as_dict(),
        "flops": flops,
        "throughput": throughput,
        "training_cost": training_cost,
        "method_state": method.state(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_rev": git_revision(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": software_versions(), "wall_time_s": round(time.time() - t_start, 1),
        "run_dir": str(run_dir),
    }
    path = write_record(results_dir, record)
    (results_dir / "failed" / f"{rid}.json").unlink(missing_ok=True)  # a stale failure of an earlier attempt
    _print_summary(record, path)
    return record


def _metrics(history: dict[int, float], images: int | None, split: str) -> dict[str, Any]:
    """Top-1 of the last evaluated epoch, the best one (labelled), every evaluated epoch and the number of
    images behind it, under ``test_*`` (final protocol) or ``val_*`` (tuning protocol: val200)."""
    epochs = sorted(history)
    other = "val" if split == "test" else "test"
    return {f"{split}_top1": history[epochs[-1]] if epochs else None,
            f"{split}_top1_best": max(history.values()) if history else None,
            f"{split}_top1_by_epoch": {str(k): history[k] for k in epochs},
            f"{split}_images": images, f"{other}_top1": None}


def _check_chaining(cfg: DictConfig, method: str, names: list[str]) -> tuple[str | None, tuple[int, Path | None]]:
    """Validate ``stop_after`` and ``init_from`` (chained runs) before any training."""
    stop_after = cfg.get("stop_after")
    if stop_after is not None and stop_after not in names:
        raise ConfigError(f"stop_after={stop_after!r} is not a stage of method {method!r}; its stages: {', '.join(names)}")
    init_from = cfg.get("init_from")
    if not init_from:
        return stop_after, (-1, None)
    path = Path(init_from)
    if not path.is_file():
        raise InputFileNotFoundError(f"init_from={init_from}: no such stage checkpoint (a finished run keeps them as "
                                f"<run_dir>/stages/<stage>.pt)")
    if path.stem not in names:
        raise ConfigError(f"init_from={init_from}: {path.stem!r} is not a stage of method {method!r}; its stages: "
                         f"{', '.join(names)}")
    return stop_after, (names.index(path.stem), path)


def _stopped(rid: str, stage: str, run_dir: Path) -> dict[str, Any]:
    print(f"[pyra_bench] {rid}: stopped after stage {stage!r} (stop_after); its checkpoint is "
          f"{run_dir / 'stages' / (stage + '.pt')}. Run the same command without stop_after to go on, or start "
          f"another run from it with init_from=...")
    return {"run_id": rid, "status": "stopped", "stage": stage, "run_dir": str(run_dir)}


def _save_stage(path: Path, model, method, eval_history: dict, training_cost: dict | None = None) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "method_state": method.state(), "eval_history": eval_history,
                "training_cost": training_cost}, tmp)
    os.replace(tmp, path)


def _flops(model, image_size: int) -> dict[str, Any]:
    try:
        from .measure import count_flops

        return count_flops(model, image_size=image_size)
    except ImportError:
        from .models.macs import model_macs

        return {"gmacs": model_macs(model) / 1e9, "counter": "analytic"}


def _print_summary(rec: dict, path: Path) -> None:
    m, p, f = rec["metrics"], rec["params"], rec["flops"] or {}
    sp, name = ("val", "val200 split (tuning protocol)") if rec.get("protocol") == "tuning" else ("test", "test split")
    lines = [
        f"run        {rec['run_id']}",
        f"top-1      {m[f'{sp}_top1']:.2f}% on the {name} (last epoch); best evaluated epoch "
        f"{m[f'{sp}_top1_best']:.2f}%" if m[f"{sp}_top1"] is not None else "top-1      (not evaluated)",
        "by epoch   " + ", ".join(f"{k}: {v:.1f}" for k, v in m[f"{sp}_top1_by_epoch"].items()),
        f"params     trainable {p['trainable']:,} | paper-counted {p['paper_counted']:,} = "
        f"{p['paper_pct']:.2f}% of the backbone ({p['backbone']:,})",
        f"MACs       {f.get('gmacs', float('nan')):.4g} G per image (inference model, LoRA merged)",
        *(f"training   {stage}: {c['img_per_s']:.1f} img/s on {c['device']}"
          + (f", peak memory {c['peak_mem_gib']:.2f} GiB" if c.get("peak_mem_gib") is not None else "")
          for stage, c in (rec.get("training_cost") or {}).items() if c.get("img_per_s")),
        f"record     {path}",
    ]
    print("\n".join(["", "=" * 72, *lines, "=" * 72]))


def _in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001
        return False


def train_with_retries(cfg: DictConfig) -> dict[str, Any]:
    """:func:`train`, tried again up to ``cfg.retries`` times after a failure that is not bad input (a
    transient CUDA / NCCL / file-system error): each attempt resumes from the run's checkpoints."""
    retries = int(cfg.get("retries", 0) or 0)
    for attempt in range(retries + 1):
        try:
            return train(cfg, fresh=bool(cfg.get("force", False)) and attempt == 0)  # retries resume
        except InputError:
            raise  # the same input fails the same way
        except Exception as e:
            if attempt == retries:
                raise
            log.warning("run failed (%s: %s); retry %d of %d, resuming from its checkpoints",
                        type(e).__name__, e, attempt + 1, retries)
    raise AssertionError("unreachable")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One run. In a sweep (``-m``) a failing run is recorded and reported, and the sweep goes on;
    a single run re-raises (non-zero exit)."""
    try:
        rec = train_with_retries(cfg)
    except Exception as e:
        _write_failure(cfg, e)
        if _in_multirun():
            log.error("run failed (recorded under %s/failed/): %s: %s", cfg.results_dir, type(e).__name__, e)
            return None
        if isinstance(e, InputError):
            exit_on_input_error(e, "pyra_bench.train")
        raise
    m = rec.get("metrics") or {}
    return m.get("test_top1") if m.get("test_top1") is not None else m.get("val_top1")


def _write_failure(cfg: DictConfig, e: BaseException) -> None:
    try:
        rid = run_id_of(cfg)
        path = Path(cfg.results_dir) / "failed" / f"{rid}.json"
        atomic_write_json(path, {"schema": 1, "run_id": rid, "status": "failed", "error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc(), "task": cfg.task.name,
                                 "backbone": cfg.backbone.name, "method": cfg.method.name,
                                 "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    except Exception:  # noqa: BLE001 - never mask the original error
        pass


if __name__ == "__main__":
    sys.exit(main())
