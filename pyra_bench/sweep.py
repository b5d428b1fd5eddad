"""Sweeps: list what a sweep would run (with GPU-hour estimates) and summarise what it did.

    python -m pyra_bench.sweep dry-run experiment=table2_vit_b          # runs, record status, GPU hours
    python -m pyra_bench.sweep summary experiment=table2_vit_b          # succeeded / failed / skipped / missing
    python -m pyra_bench.train -m experiment=table2_vit_b               # the sweep itself (summary printed at the end)

A sweep is expanded exactly as Hydra's basic sweeper does it: the experiment's ``hydra.sweeper.params``
plus the command-line overrides (which win), as a cartesian product; each combination is composed into a
full config to get its run id. A run whose record exists is skipped by ``train`` (unless ``force=true``),
so re-launching a sweep only runs what is missing or failed, and interrupted runs resume from their
checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .jobs import (  # the sweep's jobs, composed and checked
    check_data,
    check_jobs,
    compose,
    compose_jobs,
    expand_sweep,
)

log = logging.getLogger("pyra_bench")


def record_conflict(cfg: DictConfig, record: Path) -> str:
    """Why an existing record cannot be taken for this run ("" when it can): other settings, unreadable."""
    from .identity import describe_diff, result_settings, settings_diff
    from .records import read_record

    try:
        old = read_record(record)
    except (OSError, ValueError) as e:
        return f"unreadable record ({e}): the run will redo it"
    now = result_settings(cfg)
    before = {k: v for k, v in (old.get("settings") or result_settings(old.get("config") or {})).items()
              if not k.startswith("weights.")}
    diff = settings_diff(now, before)
    return f"record made with other settings: {describe_diff(diff)}" if diff else ""


def plan(overrides: list[str], check: bool = True) -> list[dict[str, Any]]:
    """Every job of the sweep with its run id, record status and estimated GPU hours; jobs with the same
    run id as an earlier one are marked ``duplicate_of`` (the sweep launches them once). Each job is checked
    first as ``train`` checks it (:func:`check_jobs`; ``check=False``: only composed): a bad one is an input
    error, nothing is listed. What depends on this machine is not (a sweep may be planned where it does not
    run): a missing data folder is the job's ``no_data`` (why ``train`` would refuse it here)."""
    from .errors import InputError
    from .estimate import gpu_hours
    from .identity import run_id
    from .records import iter_records

    jobs, seen, records = [], {}, {}
    combos = expand_sweep(overrides)
    cfgs = check_jobs(combos, machine=False) if check else compose_jobs(combos, compose)
    for combo, cfg in zip(combos, cfgs):
        if isinstance(cfg, InputError):
            raise cfg
        rid = run_id(cfg)
        try:
            check_data(cfg)
            no_data = ""
        except InputError as e:
            no_data = str(e).splitlines()[0]
        results = Path(cfg.results_dir)
        if str(results) not in records:
            records[str(results)] = iter_records([results]) if results.is_dir() else []
        record = results / f"{rid}.json"
        conflict = record_conflict(cfg, record) if record.exists() and not cfg.force else ""
        hours, basis = gpu_hours(cfg, records[str(results)])
        jobs.append({"run_id": rid, "overrides": combo, "record": record,
                     "failed": results / "failed" / f"{rid}.json", "gpu_hours": hours, "basis": basis,
                     "force": bool(cfg.force),
                     "conflict": conflict, "duplicate_of": seen.get(rid), "no_data": no_data})
        seen.setdefault(rid, len(jobs) - 1)
    return jobs


def status(job: dict[str, Any]) -> tuple[str, str]:
    """completed (a record exists) / failed (a failure newer than any record) / missing."""
    rec, failed = job["record"], job["failed"]
    rec_t = rec.stat().st_mtime if rec.exists() else None
    if failed.exists() and (rec_t is None or failed.stat().st_mtime >= rec_t):
        return "failed", json.loads(failed.read_text()).get("error", "?").splitlines()[0][:160]
    return ("completed", "") if rec_t is not None else ("missing", "")


# ---------------------------------------------------------------------------------------------------------
# A running sweep: deduplication, per-job outcomes, the end-of-sweep summary
# ---------------------------------------------------------------------------------------------------------
class DedupSweeperMixin:
    """Hydra's basic sweeper, launching each run id once: a job whose composed config has the run id of an
    earlier job of the sweep is dropped (and listed in ``<sweep dir>/sweep_plan.json``), so e.g. PEFT in a
    sweep over budgets trains once per task instead of once per budget, never twice in one folder.

    A mixin, put in front of Hydra's ``BasicSweeper`` by the plugin module (``hydra_plugins``), never bound
    to that class here: Hydra's plugin scan re-executes ``hydra._internal.core_plugins.basic_sweeper``, after
    which a class derived from the ``BasicSweeper`` imported before the scan fails its own ``super()`` call
    (a process that imported this module before its first Hydra app)."""

    def __init__(self, max_batch_size: int | None = None, params: dict | None = None):
        super().__init__(max_batch_size=max_batch_size, params=params)
        self._seen: dict[str, int] = {}
        self._plan: list[dict[str, Any]] = []
        self._launched = 0
        self._configs: dict[tuple, DictConfig] = {}

    def _compose(self, overrides: list[str]) -> DictConfig:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from .jobs import as_config_error

        try:
            return self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        except (HydraException, OmegaConfBaseException) as e:
            raise as_config_error(e, list(overrides)) from None

    def sweep(self, arguments: list[str]) -> Any:
        """Every job is composed and checked (:func:`pyra_bench.jobs.check_jobs`) before the first starts and
        before the sweep folder is made: a bad one is bad input (one message naming each bad job, exit
        status 2, nothing written). The devices, data and hub of this machine are checked when the
        launcher runs the jobs here."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        from .errors import InputError, exit_on_input_error
        from .jobs import LOCAL_LAUNCHERS

        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        combos = [c for batch in self.split_arguments(parser.parse_overrides([*self._parse_config(), *arguments]),
                                                      None) for c in batch]
        here = str(self.config.hydra.launcher.get("_target_", "")).endswith(LOCAL_LAUNCHERS)
        try:
            cfgs = check_jobs(combos, machine=here, compose_fn=self._compose)
        except InputError as e:
            exit_on_input_error(e, "pyra_bench.train")
        self._configs = {tuple(c): cfg for c, cfg in zip(combos, cfgs)}
        return super().sweep(arguments)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        """Hydra composes each job once more to validate it: :meth:`sweep` has composed and checked them."""
        if any(tuple(o) not in self._configs for o in batch):
            super().validate_batch_is_legal(batch)

    def _run_id(self, overrides: list[str]) -> str | None:
        from .identity import run_id

        try:
            cfg = self._configs.get(tuple(overrides)) or self._compose(list(overrides))
            return run_id(cfg)
        except Exception:  # noqa: BLE001 - the job itself reports what is wrong with it
            return None

    def get_job_batch(self) -> Sequence[Sequence[str]]:
        batch = super().get_job_batch()
        kept = []
        for overrides in batch:
            rid = self._run_id(list(overrides))
            if rid is not None and rid in self._seen:
                self._plan.append({"run_id": rid, "overrides": list(overrides), "job": None,
                                   "duplicate_of": self._seen[rid]})
                log.info("sweep: %s is launched once (job %d); not again for %s", rid, self._seen[rid],
                         " ".join(overrides))
                continue
            if rid is not None:
                self._seen[rid] = self._launched
            self._plan.append({"run_id": rid, "overrides": list(overrides), "job": self._launched})
            self._launched += 1
            kept.append(overrides)
        from .records import atomic_write_json

        atomic_write_json(Path(self.config.hydra.sweep.dir) / "sweep_plan.json", self._plan)
        return kept


def collect_outcomes(sweep_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The outcome of every job of a sweep folder, grouped: completed, skipped, stopped, failed,
    interrupted, missing (launched, no outcome), duplicate (not launched: same run id as another job)."""
    sweep_dir = Path(sweep_dir)
    try:
        planned = json.loads((sweep_dir / "sweep_plan.json").read_text())
    except (OSError, ValueError):
        planned = [{"job": int(p.name), "run_id": None, "overrides": []}
                   for p in sorted(sweep_dir.iterdir()) if p.is_dir() and p.name.isdigit()] if sweep_dir.is_dir() else []
    out: dict[str, list] = {k: [] for k in ("completed", "skipped", "stopped", "failed", "interrupted", "missing",
                                            "duplicate")}
    for job in planned:
        if job.get("job") is None:
            out["duplicate"].append({"run_id": job["run_id"], "why": f"same run id as job {job['duplicate_of']}"})
            continue
        path = sweep_dir / str(job["job"]) / "outcome.json"
        try:
            o = json.loads(path.read_text())
        except (OSError, ValueError):
            out["missing"].append({"run_id": job.get("run_id") or f"job {job['job']}",
                                   "why": "no outcome (not run, or the job was killed)"})
            continue
        kind = o.get("status") if o.get("status") in out else "completed"
        out[kind].append({"run_id": o.get("run_id") or job.get("run_id"), "why": (o.get("error") or "")[:200]})
    return out


def format_summary(summary: dict[str, list]) -> str:
    lines = ["sweep summary: " + ", ".join(f"{len(v)} {k}" for k, v in summary.items() if v or k in
                                             ("completed", "failed"))]
    for k in ("failed", "interrupted", "missing", "duplicate"):
        for item in summary.get(k, []):
            lines.append(f"  {k:11s} {item['run_id']}" + (f"  -- {item['why']}" if item["why"] else ""))
    return "\n".join(lines)


def report_sweep(sweep_dir: Path) -> dict[str, list]:
    """Print and save (``<sweep dir>/sweep_summary.json``) the summary of a sweep folder."""
    summary = collect_outcomes(sweep_dir)
    print("\n" + format_summary(summary), flush=True)
    try:
        from .records import atomic_write_json

        atomic_write_json(Path(sweep_dir) / "sweep_summary.json", summary)
    except OSError:
        pass
    return summary


class SummaryCallback(Callback):
    """Hydra callback: after a multirun, print (and save) what completed, failed and was skipped, and end
    with a non-zero exit status when a run failed, was interrupted or did not report."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from .cli import mark_task_started

        mark_task_started()  # the sweep's exit status is its own from here (its jobs may run elsewhere)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = report_sweep(Path(config.hydra.sweep.dir))
        bad = sum(len(summary[k]) for k in ("failed", "interrupted", "missing"))
        if bad:  # Hydra turns a callback's exception into a warning; SystemExit still ends the process
            print(f"sweep: {bad} run(s) did not complete (see the summary above)", file=sys.stderr, flush=True)
            raise SystemExit(1)


class OptunaLogging(Callback):
    """Hydra callback of ``hparams_search=optuna`` (conf/hparams_search/optuna.yaml), before the sweeper
    (and with it Optuna) is loaded: alembic, which Optuna's storage imports, logs nothing below a warning
    (not its seven "setup plugin alembic..." lines); and when stderr is not a terminal (a batch log),
    Optuna's own lines ("A new study created ...") go through the sweep's logging -- Hydra's handler, plain
    text -- instead of Optuna's colour handler, which writes ANSI escape codes. On a terminal Optuna keeps
    its colours."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.getLogger("alembic").level))
        if sys.stderr.isatty():
            return
        import optuna

        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()


def main(argv: list[str] | None = None) -> int:
    from .errors import prog_name

    ap = argparse.ArgumentParser(prog=prog_name("pyra_bench.sweep"), description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["dry-run", "summary"])
    ap.add_argument("overrides", nargs="*", help="Hydra key=value overrides, as given to `python -m pyra_bench.train -m`")
    ap.add_argument("-m", "--multirun", action="store_true",
                    help="accepted and ignored (a sweep's train command line can be pasted as it is)")
    a = ap.parse_intermixed_args(argv)
    from .cli import precheck
    from .errors import InputError, exit_on_input_error
    from .paths import TRAIN_GROUPS

    precheck("pyra_bench.sweep", TRAIN_GROUPS, a.overrides)
    try:
        jobs = plan(a.overrides, check=a.command == "dry-run")  # a summary may run where the data is not
    except InputError as e:
        exit_on_input_error(e, "pyra_bench.sweep")
    if a.command == "dry-run":
        todo = [j for j in jobs if j["duplicate_of"] is None and (not j["record"].exists() or j["force"]
                                                                  or j["conflict"].startswith("unreadable"))]
        for j in jobs:
            if j["duplicate_of"] is not None:
                mark = "dup "
            elif j in todo:
                mark = "run "
            else:
                mark = "STOP" if j["conflict"] else "skip"
            print(f"{mark}  {j['run_id']:70s} ~{j['gpu_hours']:.2f} GPU-h  {' '.join(j['overrides'])}"
                  + (f"\n      {j['conflict']}" if j["conflict"] else ""))
        stop = [j for j in jobs if j["conflict"] and j not in todo]
        dups = [j for j in jobs if j["duplicate_of"] is not None]
        hours = sum(j["gpu_hours"] for j in todo if j["gpu_hours"] == j["gpu_hours"])  # NaN: no basis
        bases = sorted({j["basis"].split(":")[0] for j in todo if j.get("basis")})
        print(f"\n{len(jobs)} jobs in the sweep ({len(dups)} duplicate run ids launched once), "
              f"{len(jobs) - len(dups) - len(todo) - len(stop)} already have records (skipped), {len(todo)} to run, "
              f"about {hours:.1f} GPU hours (estimated from: {'; '.join(bases) or 'nothing'}; pyra_bench/estimate.py)"
              + (f"; {len(stop)} would STOP: their records were made with other settings (set run_tag or "
                 f"force=true)" if stop else ""))
        no_data = [j for j in todo if j["no_data"]]
        if no_data:
            print(f"note: {len(no_data)} of the runs to do have no data folder on this machine, so train would refuse "
                  f"them here; e.g. {no_data[0]['no_data']} (python -m pyra_bench.data.prepare makes them)")
    else:
        unique = [j for j in jobs if j["duplicate_of"] is None]
        groups: dict[str, list] = {"completed": [], "failed": [], "missing": []}
        for j in unique:
            s, why = status(j)
            groups[s].append({"run_id": j["run_id"], "why": why})
        print(format_summary(groups))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
