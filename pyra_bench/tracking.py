"""Weights & Biases: a run's results in its summary, runs grouped per experiment, tagged, typed per stage.

A pyra_bench run is one W&B run (offline unless ``logger.wandb.offline=false``; its id derived from the run
id, so a resumed run continues it). What this module adds to Lightning's ``WandbLogger``:

* :func:`wandb_kwargs` -- ``group`` (the experiment, e.g. ``table2_vit_b``, so one table's runs are one
  group), ``job_type`` (``train``, ``tune`` for the tuning protocol, ``bench``) and ``tags`` (the
  experiment config's top-level ``tags:`` plus ``logger.wandb.tags``);
* :func:`log_record` -- the record's results (top-1, best top-1, parameters and the paper's "# params" %,
  MACs, throughput, training cost per stage) into the active run's summary, where W&B's tables and
  parallel-coordinate plots read them.

Offline runs sit in each run folder (``<run_dir>/wandb/offline-run-*``); upload a sweep's with
``wandb sync outputs/runs/*/wandb/offline-run-*`` (see the README).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: ``job_type`` per stage of the workflow.
JOB_TYPES = {"final": "train", "tuning": "tune", "bench": "bench"}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg.a.b`` for a DictConfig or a plain dict (records keep the resolved config as a dict)."""
    node = cfg
    for part in key.split("."):
        if node is None:
            return default
        try:
            node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
        except Exception:  # noqa: BLE001 - a missing key in a struct config
            return default
    return default if node is None else node


def _hydra_choice(group: str) -> str | None:
    """The option chosen for a config group in the running Hydra app (e.g. ``experiment``), else None."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return None
        return HydraConfig.get().runtime.choices.get(group)
    except Exception:  # noqa: BLE001
        return None


def experiment_name(cfg: Any = None) -> str | None:
    """The experiment a run belongs to: the ``experiment=`` choice of the running Hydra app, else the
    config's ``experiment_name`` (if an experiment config sets one), else None."""
    name = _hydra_choice("experiment")
    if name in (None, "null", "None"):
        name = _get(cfg, "experiment_name") if cfg is not None else None
    return None if name in (None, "null", "None", "") else str(name)


def wandb_group(cfg: Any = None) -> str | None:
    """The W&B group: the experiment (all runs of one table or figure together), else None."""
    return experiment_name(cfg)


def wandb_job_type(cfg: Any = None, stage: str | None = None) -> str:
    """``train`` (final protocol), ``tune`` (``protocol=tuning``) or ``stage`` as given (e.g. ``bench``)."""
    if stage is not None:
        return JOB_TYPES.get(stage, stage)
    return JOB_TYPES.get(str(_get(cfg, "protocol", "final")), "train")


def wandb_tags(cfg: Any) -> list[str]:
    """The experiment config's top-level ``tags`` then ``logger.wandb.tags``, without repeats."""
    out: list[str] = []
    for tags in (_get(cfg, "tags"), _get(cfg, "logger.wandb.tags")):
        if tags is None:
            continue
        if isinstance(tags, str):
            tags = [tags]
        out += [str(t) for t in tags if str(t) not in out]
    return out


def wandb_kwargs(cfg: Any, stage: str | None = None) -> dict[str, Any]:
    """The ``WandbLogger`` / ``wandb.init`` keyword arguments this module decides: group, job_type, tags."""
    return {"group": wandb_group(cfg), "job_type": wandb_job_type(cfg, stage), "tags": wandb_tags(cfg)}


def resumable_csv_logger(save_dir: str, name: str = "logs", **kwargs: Any):
    """Lightning's :class:`~lightning.pytorch.loggers.CSVLogger` with one ``metrics.csv`` per run
    (``conf/logger/csv.yaml``): version 0 always, and a writer that keeps an existing ``metrics.csv``
    (Lightning's deletes it) and continues it, so a resumed run appends to the killed one's curve instead of
    starting ``version_1``; the rows that the killed process logged after its last checkpoint (steps the
    resumed process trains again) are dropped, so every step appears once."""
    import csv

    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.loggers.logger import rank_zero_experiment

    class _Writer(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:  # keep the curve: read its header, trim on the first save
            self._trim = self._fs.isfile(self.metrics_file_path)
            if self._trim:
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

        def save(self) -> None:
            if getattr(self, "_trim", False) and self.metrics:
                first = min(int(m["step"]) for m in self.metrics)
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    rows = list(csv.DictReader(f))
                keep = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) < first]
                if len(keep) < len(rows):
                    with self._fs.open(self.metrics_file_path, "w", newline="") as f:
                        w = csv.DictWriter(f, fieldnames=self.metrics_keys)
                        w.writeheader()
                        w.writerows(keep)
                self._trim = False
            super().save()

    class _Logger(CSVLogger):
        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is None:
                self._fs.makedirs(self.root_dir, exist_ok=True)
                self._experiment = _Writer(log_dir=self.log_dir)
            return self._experiment

    kwargs.setdefault("version", 0)
    return _Logger(save_dir=save_dir, name=name, **kwargs)


def register_resolvers() -> None:
    """``${wandb_group:}`` (:func:`wandb_group`: the experiment) and ``${wandb_job_type:${protocol}}``
    (:func:`wandb_job_type`) for the ``WandbLogger`` config, resolved when the logger is built."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("wandb_group", lambda: wandb_group(), replace=True)
    OmegaConf.register_new_resolver("wandb_job_type", lambda protocol="final": wandb_job_type({"protocol": protocol}),
                                    replace=True)


def _numbers(d: Mapping[str, Any] | None, prefix: str) -> dict[str, Any]:
    """The scalar items (numbers, strings, bools) of ``d`` under ``prefix/``; nested dicts flattened."""
    out: dict[str, Any] = {}
    for k, v in (d or {}).items():
        if isinstance(v, Mapping):
            out.update(_numbers(v, f"{prefix}/{k}"))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}/{k}"] = v
    return out


def record_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's results as flat W&B summary keys.

    ``top1`` / ``top1_best``: the reported accuracy (last epoch) and the best evaluated one on the
    protocol's split (``eval_split``: test, or val200 for tuning runs), ``params/*`` (``paper_pct``: the
    paper's "# params" %), ``gmacs``, ``throughput/*``, ``training_cost/<stage>/*``, and the run's names."""
    m = record.get("metrics") or {}
    split = "val" if record.get("protocol") == "tuning" else "test"
    out: dict[str, Any] = {
        "top1": m.get(f"{split}_top1"), "top1_best": m.get(f"{split}_top1_best"), "eval_split": split,
        "eval_images": m.get(f"{split}_images"),
    }
    out.update(_numbers(record.get("params"), "params"))
    flops = record.get("flops") or {}
    out["gmacs"] = flops.get("gmacs")
    out.update({k: v for k, v in _numbers(flops, "flops").items() if k != "flops/gmacs"})
    out.update(_numbers(record.get("throughput"), "throughput"))
    out.update(_numbers(record.get("training_cost"), "training_cost"))
    for key in ("run_id", "status", "task", "group", "backbone", "backbone_label", "method", "method_key",
                "method_label", "schedule", "seed", "protocol", "run_tag", "wall_time_s"):
        if record.get(key) is not None:
            out[key] = record[key]
    return {k: v for k, v in out.items() if v is not None}


def _wandb_runs(target: Any) -> list[Any]:
    """The W&B runs behind ``target``: a run (anything with a ``summary``), a Lightning ``WandbLogger``
    (its ``experiment``), a list of loggers (the W&B ones), or None (the active ``wandb.run``)."""
    if target is None:
        try:
            import wandb
        except ImportError:
            return []
        return [wandb.run] if wandb.run is not None else []
    if isinstance(target, (list, tuple)):
        return [r for t in target for r in _wandb_runs(t)]
    if type(target).__name__ == "WandbLogger":
        return [target.experiment]
    return [target] if hasattr(target, "summary") else []


def log_record(record: Mapping[str, Any], target: Any = None) -> bool:
    """Put :func:`record_summary` of ``record`` into the W&B run summary of ``target`` (a run, a
    ``WandbLogger``, the run's list of loggers; default: the active ``wandb.run``). Returns False, doing
    nothing, when there is no W&B run (W&B not configured, or other loggers only)."""
    runs = _wandb_runs(target)
    summary = record_summary(record)
    for run in runs:
        run.summary.update(summary)
    return bool(runs)


def wandb_logger(tags: Any = (), experiment_tags: Any = (), **kwargs: Any) -> Any:
    """Lightning's ``WandbLogger(**kwargs)``, the ``_target_`` of ``conf/logger/wandb.yaml``: tagged with the
    experiment's ``tags:`` (``experiment_tags: ${tags}``) then ``tags`` (``logger.wandb.tags``), without
    repeats, so that ``'logger.wandb.tags=[mytag]'`` adds a tag instead of replacing the experiment's; and
    without the ``anonymous=None`` Lightning always hands to ``wandb.init``: wandb (>= 0.19) answers any
    value with ``wandb: WARNING The anonymous setting has no effect`` in every run of a sweep. (An explicit
    ``anonymous=true`` is passed on.)"""
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(tags=wandb_tags({"tags": experiment_tags, "logger": {"wandb": {"tags": tags}}}), **kwargs)
    init = getattr(logger, "_wandb_init", None)  # Lightning's wandb.init arguments, used on first .experiment
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    return logger
