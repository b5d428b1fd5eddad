"""``python -m pyra_bench.train``: train and evaluate one run, write its run record.

The config is composed by Hydra from ``conf/train.yaml`` (``--help`` lists the groups, each method's options,
the paper's recipe, the experiments and the sweep launchers: :mod:`pyra_bench.info`); the run itself is
:func:`pyra_bench.pipeline.run` (check -> build -> stages -> measure -> record). This entry point adds:

- retries: a failure that is not bad input is retried in place ``retries`` times, resuming from the run's
  checkpoints; bad input (:class:`~pyra_bench.errors.InputError`) is one message, exit status 2, nothing
  written; a run that cannot go on (:class:`~pyra_bench.errors.RunError`: the loss diverged, a file system is
  full or read-only, a quota or the file-size limit is reached) is one message, exit status 1, recorded under
  ``<results_dir>/failed/``, not retried;
- signals: SIGTERM / SIGINT / SIGUSR1/2 end the run with status 128 + signal after the last finished epoch
  is saved (:mod:`pyra_bench.lifecycle`); the same command resumes;
- sweeps (``-m``): each job's outcome is written to its sweep folder, a failing run never stops the others,
  and the sweep ends with a summary and a non-zero status when a run failed (:mod:`pyra_bench.sweep`).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from . import factory  # noqa: F401  (registers the config resolvers)
from .cli import hydra_app
from .errors import InputError, RunError, exit_on_input_error
from .identity import utc_now
from .paths import CONF_DIR, TRAIN_GROUPS
from .records import atomic_write_json

log = logging.getLogger("pyra_bench")


def train(cfg: DictConfig, fresh: bool | None = None, checked: bool = False) -> dict[str, Any]:
    """One run, with signals turned into :class:`RunInterrupted` (see :func:`pyra_bench.pipeline.run`)."""
    from .lifecycle import handle_signals
    from .pipeline import run

    with handle_signals():
        return run(cfg, fresh, checked)


def train_with_retries(cfg: DictConfig, checked: bool = False) -> dict[str, Any]:
    """:func:`train`, tried again up to ``cfg.retries`` times after a failure that is not bad input (a
    transient CUDA / NCCL / file-system error): each attempt resumes from the run's checkpoints."""
    retries = int(cfg.get("retries", 0) or 0)
    for attempt in range(retries + 1):
        try:
            return train(cfg, fresh=bool(cfg.get("force", False)) and attempt == 0, checked=checked)  # retries resume
        except (InputError, RunError):
            raise  # the same input fails the same way; a diverged run or a full disk too
        except Exception as e:
            from .fileio import as_write_failure

            # (pyra_bench's own writes are named where they happen: fileio.writing)
            name = getattr(e, "filename", None)
            failure = as_write_failure(e, Path(name) if name else Path(str(cfg.get("run_dir") or ".")) / "(a file)")
            if failure is not None:
                raise failure from e
            if attempt == retries:
                raise
            log.warning("run failed (%s: %s); retry %d of %d, resuming from its checkpoints",
                        type(e).__name__, e, attempt + 1, retries)
    raise AssertionError("unreachable")


def _hydra_job_dir() -> Path | None:
    """The sweep folder of this job (None for a single run)."""
    from .launcher import JOB_DIR_ENV

    if os.environ.get(JOB_DIR_ENV):
        return Path(os.environ[JOB_DIR_ENV])
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            return Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001
        pass
    return None


def _write_outcome(job_dir: Path | None, cfg: DictConfig, status: str, error: BaseException | None = None,
                   result: dict | None = None) -> None:
    """A sweep job's outcome, read by the end-of-sweep summary (:class:`pyra_bench.sweep.SummaryCallback`)."""
    if job_dir is None:
        return
    try:
        atomic_write_json(job_dir / "outcome.json", {
            "run_id": cfg.get("run_id") or (result or {}).get("run_id"), "status": status,
            "error": f"{type(error).__name__}: {error}" if error is not None else None,
            "record": (result or {}).get("path"), "created": utc_now()})
    except Exception:  # noqa: BLE001 - never mask the run's own outcome
        log.exception("could not write the sweep outcome file")


def _write_failure(cfg: DictConfig, e: BaseException) -> None:
    """``<results_dir>/failed/<run_id>.json``: why a run failed (not for bad input: nothing is written)."""
    rid = cfg.get("run_id")
    if not rid:
        return
    try:
        atomic_write_json(Path(cfg.results_dir) / "failed" / f"{rid}.json", {
            "schema": 1, "run_id": rid, "status": "failed", "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(), "task": cfg.task.name, "backbone": cfg.backbone.name,
            "method": cfg.method.name, "created": utc_now()})
    except Exception:  # noqa: BLE001 - never mask the original error
        pass


def _setup_logging() -> None:
    try:
        from .console import setup_logging
    except ImportError:
        return
    setup_logging()


@hydra_app(config_path=str(CONF_DIR), config_name="train")  # hydra.main; --help alone: info.fast_help
def main(cfg: DictConfig) -> float | None:
    """One run; in a sweep (``-m``) a failing run is recorded and reported and the sweep goes on. The config
    is checked here, once, before Lightning is imported -- unless the sweeper has checked it on this machine."""
    from .cli import mark_task_started

    mark_task_started()
    job_dir = _hydra_job_dir()
    checked = _checked_by_sweeper()
    try:
        if not checked:
            from .jobs import check_job

            check_job(cfg)
            checked = True
    except InputError as e:
        _write_outcome(job_dir, cfg, "failed", e)
        if job_dir is not None:
            log.error("bad input: %s", e)
            return None
        exit_on_input_error(e, "pyra_bench.train")
    from .lifecycle import RunInterrupted  # (imported here: --help and bad input stay fast)

    _setup_logging()

    try:
        rec = train_with_retries(cfg, checked)
    except RunInterrupted as e:
        log.error("%s: %s; its last finished epoch is saved; run the same command to resume", cfg.get("run_id"), e)
        _write_outcome(job_dir, cfg, "interrupted", e)
        if job_dir is not None:
            from .sweep import report_sweep

            report_sweep(job_dir.parent)
        raise SystemExit(e.exit_code) from None
    except InputError as e:
        _write_outcome(job_dir, cfg, "failed", e)
        if job_dir is not None:
            log.error("bad input: %s", e)
            return None
        exit_on_input_error(e, "pyra_bench.train")
    except RunError as e:  # one message, no traceback (it is in results_dir/failed/<run_id>.json)
        if e.record_failure:
            _write_failure(cfg, e)
        _write_outcome(job_dir, cfg, "failed", e)
        log.error("%s: run failed: %s", cfg.get("run_id"), e)
        if job_dir is not None:
            return None
        raise SystemExit(e.exit_code) from None
    except Exception as e:
        _write_failure(cfg, e)
        _write_outcome(job_dir, cfg, "failed", e)
        if job_dir is not None:
            log.error("run failed (recorded under %s/failed/): %s: %s", cfg.results_dir, type(e).__name__, e)
            return None
        raise
    _write_outcome(job_dir, cfg, rec.get("status", "completed"), result=rec)
    if rec.get("status") == "skipped":  # a finished run still answers with its result (e.g. to Optuna)
        from .records import read_record

        rec = read_record(rec["path"])
    from .records import objective

    return objective(rec, cfg.get("optimized_metric") or "top1")  # to a sweeper (Optuna): conf/hparams_search/


def _checked_by_sweeper() -> bool:
    """Whether this job's config was checked by the sweeper, on this machine, before the sweep started
    (:class:`pyra_bench.sweep.DedupSweeperMixin` with a local launcher)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .jobs import LOCAL_LAUNCHERS

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    h = HydraConfig.get()
    return (str(h.sweeper.get("_target_", "")).endswith("DedupSweeper")
            and str(h.launcher.get("_target_", "")).endswith(LOCAL_LAUNCHERS))


def cli() -> None:
    """The console entry point: unknown group choices exit with status 2 before Hydra starts; the settings
    are checked once where the job's config is (:func:`main`, or the sweeper for a sweep's jobs); a command
    line Hydra cannot compose (``trainer.lrr=1``) is bad input too: status 2 (nothing is written)."""
    from . import cli as cli_module

    cli_module.precheck("pyra_bench.train", TRAIN_GROUPS)
    cli_module.TASK_STARTED = False
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not cli_module.TASK_STARTED:  # Hydra printed why it could not compose the config
            print("pyra_bench.train: error: the command line does not make a valid config (Hydra's message above; "
                  "python -m pyra_bench.train --help lists the groups and settings)", file=sys.stderr)
            raise SystemExit(2) from None
        raise


if __name__ == "__main__":
    cli()
