"""One run, top to bottom: check -> build -> run the stages -> measure -> write the record.

:func:`run` is the whole run; each step is a function of its own:

1. :func:`check` -- every input, cheapest first, before anything is built or written: config values and
   Trainer options, the run's identity, the data folder and split lists, the method and its operating
   point, the weights (file, hash), stage chaining, the state already in the run folder (a run folder of
   another run, or a finished stage or checkpoint made with other settings is an error; a corrupt or
   changed one -- stage tensors are checked against their checksum -- is set aside and redone), and last,
   as the slowest, every image. An existing record made with the same settings skips the run.
2. the run folder's lock (:func:`pyra_bench.lifecycle.run_lock`: one writer per run folder; another process
   holding it ends this command at once, exit status 75), held to the end; the record and the run folder's
   state are checked again under it. Then :func:`build` -- the data modules and the model (frozen
   backbone, LoRA, method).
3. :func:`open_run_folder` -- the first write: the run folder, its config, the git diff, the log file.
4. :func:`run_stages` -- each stage of the method is one Lightning ``fit``, checkpointed every epoch
   (``<run_dir>/ckpt/<stage>/last.ckpt``) and saved when finished (``<run_dir>/stages/<stage>.*``); the
   same command resumes from the last finished epoch.
5. :func:`measure` -- parameters, MACs (optionally throughput) of the LoRA-merged inference model, which is
   exported next to the checkpoints.
6. :func:`make_record` + :func:`pyra_bench.records.write_record` -- the run record, atomically.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from . import factory
from .errors import CheckpointFormatError, ConfigError, InputFileNotFoundError, SettingsMismatchError
from .identity import (
    compression_str,
    describe_diff,
    git_state,
    method_key,
    method_options,
    result_settings,
    run_id,
    settings_diff,
    software_versions,
    utc_now,
    weights_source,
)
from .lifecycle import (
    EpochCheckpoint,
    RunClock,
    load_stage,
    quarantine,
    read_checkpoint_meta,
    run_lock,
    save_stage,
    stage_paths,
    verify_stage,
)
from .records import atomic_write_json, atomic_write_text, read_record, write_record

log = logging.getLogger("pyra_bench")

RUN_STATE = ("ckpt", "stages", "inference_model.safetensors", "inference_model.json", "clock.json")  # cleared by force=true


@dataclass
class Plan:
    """What :func:`check` found: the run's identity, where it writes, and what it resumes from."""

    cfg: DictConfig
    run_id: str
    run_dir: Path
    results_dir: Path
    record_path: Path
    fresh: bool
    datamodule: Any = None
    stage_data: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: str | None = None
    weights: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    stages: list = field(default_factory=list)
    stop_after: str | None = None
    init_index: int = -1
    init_path: Path | None = None
    set_aside: list[Path] = field(default_factory=list)  # corrupt files to move away before the run
    skip: dict[str, Any] | None = None
    git: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    clock: Any = None  # lifecycle.RunClock, from when the run folder is opened


# ---------------------------------------------------------------------------------------------------------
# 1. check
# ---------------------------------------------------------------------------------------------------------
def assign_identity(cfg: DictConfig) -> tuple[str, Path]:
    """Set ``cfg.run_id`` and (when null) ``cfg.run_dir = <runs_root>/<run_id>``; return both."""
    rid = run_id(cfg)
    with open_dict(cfg):
        cfg.run_id = rid
        if cfg.get("run_dir") in (None, "", "null"):
            cfg.run_dir = str(Path(cfg.runs_root) / rid)
    return rid, Path(cfg.run_dir)


def _check_values(cfg: DictConfig, checked: bool) -> None:
    """The schema's checks (unless the entry point has made them: ``checked``) and the Trainer options."""
    if not checked:
        from .jobs import check_job

        check_job(cfg)
    factory.check_trainer_options(cfg)


def _check_chaining(cfg: DictConfig, method: str, names: list[str]) -> tuple[str | None, int, Path | None]:
    """Validate ``stop_after`` and ``init_from`` (chained runs)."""
    stop_after = cfg.get("stop_after")
    if stop_after is not None and stop_after not in names:
        raise ConfigError(f"stop_after={stop_after!r} is not a stage of method {method!r}; its stages: {', '.join(names)}")
    init_from = cfg.get("init_from")
    if not init_from:
        return stop_after, -1, None
    path = Path(init_from)
    if path.suffix != ".json":  # <stage>.safetensors or the stage name without suffix
        path = path.with_suffix(".json")
    if not path.is_file():
        raise InputFileNotFoundError(f"init_from={init_from}: no such stage file (a finished run keeps them as "
                                     f"<run_dir>/stages/<stage>.json + .safetensors)")
    if path.stem not in names:
        raise ConfigError(f"init_from={init_from}: {path.stem!r} is not a stage of method {method!r}; its stages: "
                          f"{', '.join(names)}")
    verify_stage(path)  # unreadable / truncated / changed -> a clear error now, before anything is written
    return stop_after, names.index(path.stem), path


def _mismatch(what: Path, diff: list) -> SettingsMismatchError:
    return SettingsMismatchError(
        f"{what} was made with other settings: {describe_diff(diff)}\n  Set run_tag=<name> to keep both runs "
        f"apart, or force=true to discard it and start afresh.")


def _check_existing_state(plan: Plan) -> None:
    """Finished stages and the checkpoints of this run folder must have been made with these settings;
    a corrupt one is set aside (moved to ``*.corrupt`` when the run starts) and redone."""
    kinds = ((sorted((plan.run_dir / "stages").glob("*.json")), verify_stage, "the stage is trained again"),
             (sorted((plan.run_dir / "ckpt").glob("*/last.ckpt")), read_checkpoint_meta,
              "its stage starts again from its first epoch"))
    for paths, read, redo in kinds:
        for path in paths:
            try:
                meta = read(path)
            except CheckpointFormatError as e:
                log.warning("%s; it is set aside and %s", e, redo)
                plan.set_aside.append(path)
                continue
            diff = settings_diff(plan.settings, meta.get("settings") or {})
            if diff:
                raise _mismatch(path, diff)


def _check_record(plan: Plan) -> None:
    """An existing record of this run id: the same settings -> skip the run; other settings -> error;
    unreadable -> set aside and redo the run."""
    path = plan.record_path
    if not path.exists() or plan.fresh:
        return
    try:
        old = read_record(path)
    except (OSError, ValueError) as e:
        log.warning("the record %s is unreadable (%s); it is set aside and the run is done again", path, e)
        plan.set_aside.append(path)
        return
    before = old.get("settings") or result_settings(old.get("config") or {})
    diff = settings_diff(plan.settings, before)
    if diff:
        raise _mismatch(path, diff)
    plan.skip = {"run_id": plan.run_id, "status": "skipped", "path": str(path)}


def _run_folder_config(plan: Plan) -> dict | None:
    """The config of the run that last used the run folder (``config.json``), None if none or unreadable."""
    try:
        old = json.loads((plan.run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else None


def _check_run_state(plan: Plan) -> None:
    """The record; whose folder the run folder is (it holds one run: ``config.json`` of another run id or, when
    no finished stage or checkpoint says more, of other settings is refused; ``force=true`` takes it over);
    its finished stages and checkpoints (see :func:`check`)."""
    plan.skip, plan.set_aside = None, []
    _check_record(plan)
    if plan.skip is not None or plan.fresh:
        return
    old = _run_folder_config(plan)
    if old is not None and old.get("run_id") not in (None, plan.run_id):
        raise ConfigError(f"run_dir={plan.run_dir} holds another run, {old.get('run_id')!r} (its config.json); a run "
                          f"folder holds one run: leave run_dir unset (each run gets <runs_root>/<run_id>), choose "
                          f"another folder, or force=true to discard that run's state there")
    _check_existing_state(plan)
    if old is not None:
        diff = settings_diff({k: v for k, v in plan.settings.items() if not k.startswith("weights.")},
                             result_settings(old))
        if diff:
            raise _mismatch(plan.run_dir / "config.json", diff)


def check(cfg: DictConfig, fresh: bool = False, checked: bool = False) -> Plan:
    """Check every input (see the module docstring); ``checked``: the config's values and data folder have
    been checked already (:func:`pyra_bench.jobs.check_job`, by ``train`` or the sweeper). Writes nothing
    (the demo backbone's one-time pre-training writes to the user cache)."""
    _check_values(cfg, checked)
    rid, run_dir = assign_identity(cfg)
    results_dir = Path(cfg.results_dir)
    plan = Plan(cfg, rid, run_dir, results_dir, results_dir / f"{rid}.json", fresh)
    # data: folder, split lists, labels, listed files (no decoding yet)
    plan.datamodule = factory.make_datamodule(cfg)
    num_classes = plan.datamodule.num_classes
    # the method and its operating point, before any slow weights work (demo pre-training, a download);
    # built without memory or weight initialisation (meta tensors: shapes only) unless the operating point
    # is timed on the real model (``speedup:<x>``)
    model = factory.make_model(cfg, num_classes, pretrained=False, checkpoint=None, abstract=True)
    method = model.pyra_method
    plan.stages = method.stages()
    plan.stop_after, plan.init_index, plan.init_path = _check_chaining(cfg, method.name, [s.name for s in plan.stages])
    plan.stage_data = {s.task: factory.make_datamodule(cfg, s.task) for s in plan.stages
                       if s.task and s.task != cfg.task.name}
    _check_eval_epochs(cfg, plan.stages)
    timm_name = getattr(model.pyra_backbone, "timm_name", None)
    del model
    # weights: a missing file fails here; the source (with its hash) is part of the run's settings
    plan.pretrained, plan.checkpoint = factory.resolve_weights(cfg.backbone)
    plan.weights = weights_source(cfg.backbone.get("weights"), plan.checkpoint, timm_name)
    plan.settings = result_settings(cfg, plan.weights)
    _check_run_state(plan)
    if plan.skip is not None:
        return plan
    if cfg.get("verify_images", True):  # the slowest check last: decode every image once (remembered)
        for d in (plan.datamodule, *plan.stage_data.values()):
            d.verify()
    plan.git = git_state()
    return plan


def _check_eval_epochs(cfg: DictConfig, stages: list) -> None:
    """``trainer.eval_epochs`` count global epochs: each must fall inside the run's stages."""
    listed = cfg.trainer.get("eval_epochs")
    if cfg.trainer.get("evaluation", "every_n") != "epochs" or not listed:
        return
    total = sum(_stage_epochs(cfg, s) for s in stages)
    outside = [int(e) for e in listed if not 1 <= int(e) <= total]
    if outside:
        raise ConfigError(f"trainer.eval_epochs={list(listed)}: {outside} outside the run's {total} epochs "
                          f"(global epochs over its stages: {', '.join(s.name for s in stages)})")


# ---------------------------------------------------------------------------------------------------------
# 2. build, 3. open the run folder
# ---------------------------------------------------------------------------------------------------------
def build(plan: Plan):
    """The model for this run (seeded), with the pre-trained weights."""
    import lightning as L

    L.seed_everything(int(plan.cfg.seed), workers=True, verbose=False)
    model = factory.make_model(plan.cfg, plan.datamodule.num_classes, plan.pretrained, plan.checkpoint)
    compile_with = plan.cfg.trainer.get("compile") or False
    if compile_with:  # in place (nn.Module.compile): parameter names, checkpoints and stage files unchanged
        model.compile(backend="inductor" if compile_with is True else str(compile_with), dynamic=False)
    return model


def open_run_folder(plan: Plan) -> None:
    """The run's first write: set corrupt files aside, clear a fresh run's state, write the config, the
    command line and the git diff, and start the run's log file ``<run_dir>/train.log``."""
    for path in plan.set_aside:
        if path.exists():
            log.warning("moved %s to %s", path, quarantine(path))
    if plan.fresh:
        for name in RUN_STATE:
            path = plan.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan.run_dir / "config.json", OmegaConf.to_container(plan.cfg, resolve=True))
    if _is_global_zero():
        plan.clock = RunClock(plan.run_dir, fresh=plan.fresh)
    if plan.git.get("diff"):
        atomic_write_text(plan.run_dir / "git.diff", plan.git["diff"])
    attach_run_log(plan.run_dir)


def attach_run_log(run_dir: Path) -> None:
    """Log the run's lines (``pyra_bench`` and Lightning) to ``<run_dir>/train.log`` as well."""
    try:
        from .console import attach_run_log as attach
    except ImportError:
        path = str(run_dir / "train.log")
        root = logging.getLogger()
        if not any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path)
                   for h in root.handlers):
            h = logging.FileHandler(path)
            h.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
            root.addHandler(h)
    else:
        attach(run_dir)


# ---------------------------------------------------------------------------------------------------------
# 4. stages
# ---------------------------------------------------------------------------------------------------------
EVALUATIONS = ("every_n", "final", "epochs")  # trainer.evaluation


def eval_epochs(t: DictConfig, offset: int, epochs: int, is_last: bool) -> list[int]:
    """Global epochs after which a stage evaluates: ``every_n`` -- every ``eval_every`` epochs of the stage
    (the paper's protocol); ``final`` -- only after the last epoch (VTAB's); ``epochs`` -- the listed
    global epochs (``trainer.eval_epochs``, e.g. the authors' 1, 11, ..., 91, 100). The last epoch of the
    run is always evaluated: it is the reported number."""
    kind = t.get("evaluation", "every_n")
    if kind == "every_n":
        every = int(t.get("eval_every") or epochs)
        out = {offset + j for j in range(1, epochs + 1) if j % every == 0}
    elif kind == "epochs":
        out = {int(e) for e in (t.get("eval_epochs") or []) if offset < int(e) <= offset + epochs}
    else:
        out = set()
    if is_last:
        out.add(offset + epochs)
    return sorted(out)


@dataclass
class StageResults:
    history: dict[int, float] = field(default_factory=dict)
    eval_images: int | None = None
    training_cost: dict[str, Any] = field(default_factory=dict)
    stopped_after: str | None = None


def _optim(cfg: DictConfig) -> dict[str, Any]:
    t = cfg.trainer
    return {"lr": t.lr, "weight_decay": t.weight_decay, "warmup_lr": t.warmup_lr, "min_lr": t.min_lr,
            "warmup_epochs": t.warmup_epochs, "method_lr": cfg.method.get("lr"),
            "method_weight_decay": cfg.method.get("weight_decay")}


def _stage_epochs(cfg: DictConfig, stage) -> int:
    return max(1, round(cfg.trainer.epochs * stage.epochs_fraction)) if stage.epochs_fraction > 0 else 0


def run_stages(plan: Plan, model, loggers: list) -> StageResults:
    """Train (or restore) each stage in order; see the module docstring."""
    from .lit import AdaptationModule, TrainingCost

    cfg, method, out = plan.cfg, model.pyra_method, StageResults()
    stages_dir = plan.run_dir / "stages"
    evaluating = [i for i, s in enumerate(plan.stages) if s.evaluate]
    last_eval = evaluating[-1] if evaluating else len(plan.stages) - 1
    offset = 0
    for i, stage in enumerate(plan.stages):
        n_epochs = _stage_epochs(cfg, stage)
        if i < plan.init_index:  # covered by the init_from stage file of a later stage
            offset += n_epochs
            continue
        own = stage_paths(stages_dir, stage.name)[1]
        source = plan.init_path if i == plan.init_index and not own.exists() else own
        if source is not None and source.exists():
            state, meta = load_stage(source)
            method.restore(model, meta["method_state"])
            model.load_state_dict(state)
            out.history.update({int(k): v for k, v in (meta.get("eval_history") or {}).items()})
            out.eval_images = meta.get("eval_images", out.eval_images)
            if meta.get("training_cost"):
                out.training_cost[stage.name] = meta["training_cost"]
            log.info("stage %r already finished; restored from %s", stage.name, source)
        else:
            sdm = plan.stage_data.get(stage.task, plan.datamodule)
            method.on_stage_start(stage, model, sdm)
            cost = None
            if n_epochs > 0:
                cost = _fit_stage(plan, model, stage, i, n_epochs, offset, sdm, loggers, out,
                                  AdaptationModule, TrainingCost, is_last=i == last_eval)
            if _is_global_zero():
                save_stage(stages_dir, stage.name, model.state_dict(), {
                    "method_state": method.state(), "settings": plan.settings,
                    "eval_history": {str(k): v for k, v in out.history.items() if offset < k <= offset + n_epochs},
                    "eval_images": out.eval_images, "training_cost": cost})
                if plan.clock is not None:
                    plan.clock.save()
            if cost:
                out.training_cost[stage.name] = cost
        offset += n_epochs
        if stage.name == plan.stop_after and i < len(plan.stages) - 1:
            out.stopped_after = stage.name
            return out
    return out


def _fit_stage(plan: Plan, model, stage, index: int, n_epochs: int, offset: int, sdm, loggers: list,
               out: StageResults, module_cls, cost_cls, is_last: bool) -> dict | None:
    from .lit import FiniteLoss, ScheduledEvaluation

    cfg, t = plan.cfg, plan.cfg.trainer
    module = module_cls(model, plan.datamodule.num_classes, _optim(cfg), n_epochs, offset,
                        eval_epochs=eval_epochs(t, offset, n_epochs, is_last) if stage.evaluate else (),
                        seed=int(cfg.seed), stage_index=index, settings=plan.settings,
                        eval_precision=str(t.get("eval_precision", "auto")), eval_data=plan.datamodule)
    ckpt = plan.run_dir / "ckpt" / stage.name / "last.ckpt"
    cost = cost_cls()
    callbacks = [FiniteLoss(), cost, ScheduledEvaluation(),
                 EpochCheckpoint(ckpt, int(t.get("checkpoint_every") or 1), on_save=plan.clock and plan.clock.save),
                 *factory.make_callbacks(cfg, with_loggers=bool(loggers))]
    trainer = factory.make_trainer(cfg, max_epochs=n_epochs, callbacks=callbacks, loggers=loggers,
                                   run_dir=plan.run_dir)
    resume = ckpt if ckpt.exists() else None
    done = read_checkpoint_meta(ckpt)["epoch"] if resume else 0
    log.info("%s: stage %d/%d %r, %d epochs%s", plan.run_id, index + 1, len(plan.stages), stage.name, n_epochs,
             f" (resuming after epoch {done} from {ckpt})" if resume else "")
    trainer.fit(module, datamodule=sdm, ckpt_path=str(resume) if resume else None, weights_only=True)
    out.history.update(module.eval_history)
    if module.eval_images is not None:
        out.eval_images = module.eval_images
    return cost.summary()


def _is_global_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0 \
        and int(os.environ.get("NODE_RANK", "0")) == 0


# ---------------------------------------------------------------------------------------------------------
# 5. measure, 6. record
# ---------------------------------------------------------------------------------------------------------
def measure(plan: Plan, model) -> dict[str, Any]:
    """Parameters, MACs and (``measure_throughput=true``) throughput of the LoRA-merged inference model,
    which is exported to ``<run_dir>/inference_model.*`` (``export_inference_model``)."""

    from .models import count_parameters

    cfg, method = plan.cfg, model.pyra_method
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
            device = factory.run_device(cfg)
        batch = tp.get("batch_size") or default_batch_size(device)
        throughput = measure_throughput(copy.deepcopy(infer), batch_size=int(batch), image_size=cfg.backbone.image_size,
                                        device=device, dtype=tp.get("dtype", "float32"),
                                        warmup_s=float(tp.get("warmup_s", 10.0)),
                                        duration_s=float(tp.get("duration_s", 10.0)))
    if cfg.get("export_inference_model", True):
        from .export import save_inference_model

        save_inference_model(plan.run_dir, infer, method, cfg)
    return {"params": params.as_dict(), "flops": flops, "throughput": throughput}


def _flops(model, image_size: int) -> dict[str, Any]:
    try:
        from .measure import count_flops

        return count_flops(model, image_size=image_size)
    except ImportError:
        from .models.macs import model_macs

        return {"gmacs": model_macs(model) / 1e9, "counter": "analytic"}


def metrics(history: dict[int, float], images: int | None, split: str) -> dict[str, Any]:
    """Top-1 of the last evaluated epoch, the best one (labelled), every evaluated epoch and the number of
    images behind it, under ``test_*`` (final protocol) or ``val_*`` (tuning protocol: val200)."""
    epochs = sorted(history)
    other = "val" if split == "test" else "test"
    return {f"{split}_top1": history[epochs[-1]] if epochs else None,
            f"{split}_top1_best": max(history.values()) if history else None,
            f"{split}_top1_by_epoch": {str(k): history[k] for k in epochs},
            f"{split}_images": images, f"{other}_top1": None}


def command_line_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except Exception:  # noqa: BLE001
        return []


def make_record(plan: Plan, model, results: StageResults, measured: dict[str, Any]) -> dict[str, Any]:

    cfg, method = plan.cfg, model.pyra_method
    protocol = cfg.get("protocol", "final")
    t = cfg.trainer
    spec = getattr(model, "pyra_backbone", None)
    backbone_label = str(cfg.backbone.get("display_name") or (spec.label if spec is not None else cfg.backbone.name))
    return {
        "run_id": plan.run_id, "status": "completed", "task": cfg.task.name, "group": plan.datamodule.spec.group,
        "task_label": plan.datamodule.spec.display,
        "backbone": cfg.backbone.name, "backbone_label": backbone_label,
        "method": cfg.method.name, "method_key": method_key(cfg.method), "method_label": type(method).label(),
        "method_options": method_options(cfg.method),
        "schedule": compression_str(cfg.compression), "seed": int(cfg.seed), "run_tag": cfg.get("run_tag"),
        "protocol": protocol,
        "eval_protocol": {"evaluation": t.get("evaluation", "every_n"), "eval_every": t.get("eval_every"),
                          "evaluated_epochs": sorted(results.history)},
        "data_format": plan.datamodule.data_format, "data": plan.datamodule.describe(),
        "weights": plan.weights,
        "metrics": metrics(results.history, results.eval_images, "val" if protocol == "tuning" else "test"),
        **measured,
        "training_cost": results.training_cost,
        "method_state": method.state(),
        "settings": plan.settings,
        "overrides": command_line_overrides(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_rev": (plan.git.get("rev", "") + ("+dirty" if plan.git.get("dirty") else "")) or None,
        "git": {k: v for k, v in plan.git.items() if k != "diff"},
        "created": utc_now(), "versions": software_versions(), "wall_time_s": round(plan.clock.seconds() if plan.clock else time.time() - plan.started, 1),
        "resumes": plan.clock.processes - 1 if plan.clock else 0,  # processes after the first that worked on it
        "run_dir": str(plan.run_dir),
    }


def _folded(rec: dict) -> str:
    """How the run's PEFT is in its inference model: LoRA folds into qkv; adapters, prompts and prefix stay."""
    from .identity import peft_choice

    peft = peft_choice((rec.get("config") or {}).get("peft"))
    return "LoRA merged" if peft == "lora" else f"peft={peft} kept: it does not fold, its cost is counted"


def log_summary(rec: dict, path: Path) -> None:
    m, p, f = rec["metrics"], rec["params"], rec["flops"] or {}
    sp, name = ("val", "val200 split (tuning protocol)") if rec.get("protocol") == "tuning" else ("test", "test split")
    lines = [
        f"run        {rec['run_id']}",
        f"top-1      {m[f'{sp}_top1']:.2f}% on the {name} (last epoch); best evaluated epoch "
        f"{m[f'{sp}_top1_best']:.2f}%" if m[f"{sp}_top1"] is not None else "top-1      (not evaluated)",
        "by epoch   " + ", ".join(f"{k}: {v:.1f}" for k, v in m[f"{sp}_top1_by_epoch"].items()),
        f"params     trainable {p['trainable']:,} | paper-counted {p['paper_counted']:,} = "
        f"{p['paper_pct']:.2f}% of the backbone ({p['backbone']:,})",
        f"MACs       {f.get('gmacs', float('nan')):.4g} G per image (inference model, {_folded(rec)})",
        *(f"training   {stage}: {c['img_per_s']:.1f} img/s on {c['device']}"
          + (f", peak memory {c['peak_mem_gib']:.2f} GiB" if c.get("peak_mem_gib") is not None else "")
          for stage, c in (rec.get("training_cost") or {}).items() if c and c.get("img_per_s")),
        f"record     {path}",
    ]
    log.info("\n".join(["", "=" * 72, *lines, "=" * 72]))


# ---------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------
def run(cfg: DictConfig, fresh: bool | None = None, checked: bool = False) -> dict[str, Any]:
    """One run (see the module docstring). ``fresh`` (default ``cfg.force``): discard the run folder's
    checkpoints and finished stages and retrain; otherwise an interrupted run resumes from them.
    ``checked``: the entry point has checked the config's values (:func:`check`)."""
    import torch

    fresh = bool(cfg.get("force", False)) if fresh is None else fresh
    if cfg.trainer.get("cpu_threads"):
        torch.set_num_threads(int(cfg.trainer.cpu_threads))
    plan = check(cfg, fresh, checked)
    if plan.skip is not None:
        log.info("%s: record exists (%s), made with the same settings; skipping (force=true to re-run)",
                 plan.run_id, plan.record_path)
        return plan.skip
    with run_lock(plan.run_dir, plan.run_id) if _is_global_zero() else contextlib.nullcontext():
        _check_run_state(plan)  # again, under the lock: a run that held it before may have finished
        if plan.skip is not None:
            log.info("%s: finished by another process meanwhile (%s); skipping", plan.run_id, plan.record_path)
            return plan.skip
        return _run_locked(plan)


def _run_locked(plan: Plan) -> dict[str, Any]:
    """Steps 2-6 of :func:`run`, holding the run folder's lock."""
    cfg = plan.cfg
    model = build(plan)
    open_run_folder(plan)
    loggers = factory.make_loggers(cfg)
    try:
        results = run_stages(plan, model, loggers)
        if results.stopped_after is not None:
            log.info("%s: stopped after stage %r (stop_after); its stage file is %s. Run the same command "
                     "without stop_after to go on, or start another run from it with init_from=...", plan.run_id,
                     results.stopped_after, stage_paths(plan.run_dir / "stages", results.stopped_after)[1])
            return {"run_id": plan.run_id, "status": "stopped", "stage": results.stopped_after,
                    "run_dir": str(plan.run_dir)}
        if not _is_global_zero():
            return {"run_id": plan.run_id, "status": "worker"}
        record = make_record(plan, model, results, measure(plan, model))
        path = write_record(plan.results_dir, record)
        if plan.git.get("diff"):
            atomic_write_text(path.with_suffix(".git.diff"), plan.git["diff"])
        (plan.results_dir / "failed" / f"{plan.run_id}.json").unlink(missing_ok=True)  # an earlier attempt's
        _report_to_loggers(loggers, record)
        log_summary(record, path)
        return record
    finally:
        _finish_loggers(loggers)


def _report_to_loggers(loggers: list, record: dict) -> None:
    try:
        from .tracking import log_record
    except ImportError:
        return
    log_record(record, loggers)


def _finish_loggers(loggers: list) -> None:
    """Close a W&B run (each run of a Hydra multirun must finish its own, wandb#1314)."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()
