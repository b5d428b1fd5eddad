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
import itertools
import json
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

#: Rough GPU hours of one 100-epoch VTAB-1k run (1,000 training images, 11 test evaluations) on one
#: RTX 3090 / A100-class GPU, from the paper's throughputs and the recipe; token-merging methods train
#: about 1.3x faster, the three-stage baselines take about twice the epochs. Estimates, not measurements.
GPU_HOURS_PER_100_EPOCHS = {"vit_s16_in21k": 0.08, "deit_s16_distilled": 0.08, "vit_b16_in21k": 0.25,
                            "vit_b16_mae": 0.25, "deit_b16_distilled": 0.25, "vit_l16_in21k": 0.8, "vit_l16_mae": 0.8}
METHOD_FACTOR = {"tome": 0.75, "pyra": 0.77, "peft": 1.0, "spvit": 2.0, "rap": 2.0, "diffrate": 1.1}


def _compose(overrides: list[str], hydra_cfg: bool = False) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import pyra_bench.train  # noqa: F401  (registers the config resolvers)

    if GlobalHydra.instance().is_initialized():  # e.g. called from the multirun-end callback
        GlobalHydra.instance().clear()

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra_cfg)


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """The override list of every job the basic sweeper would launch."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    base = _compose([o for o in overrides if "," not in o.split("=", 1)[-1] or o.startswith("experiment=")], True)
    params = base.hydra.sweeper.get("params") or {}
    parser = OverridesParser.create()
    by_key: dict[str, Any] = {}
    for o in parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides)):
        by_key[o.get_key_element()] = o
    lists = []
    for key, o in by_key.items():
        if o.is_sweep_override():
            lists.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            lists.append([f"{key}={o.get_value_element_as_str()}"])
    return [list(c) for c in itertools.product(*lists)]


def plan(overrides: list[str]) -> list[dict[str, Any]]:
    from .errors import ConfigError
    from .train import check_record_matches, run_id_of

    jobs = []
    for combo in expand_sweep(overrides):
        cfg = _compose(combo)
        rid = run_id_of(cfg)
        results = Path(cfg.results_dir)
        record, conflict = results / f"{rid}.json", ""
        if record.exists() and not cfg.force:
            try:
                check_record_matches(cfg, record)
            except ConfigError as e:
                conflict = str(e).splitlines()[0]
        hours = GPU_HOURS_PER_100_EPOCHS.get(cfg.backbone.name, 0.0) * cfg.trainer.epochs / 100 \
            * METHOD_FACTOR.get(cfg.method.name, 1.0)
        jobs.append({"run_id": rid, "overrides": combo, "record": record,
                     "failed": results / "failed" / f"{rid}.json", "gpu_hours": hours, "force": bool(cfg.force),
                     "conflict": conflict})
    return jobs


def status(job: dict[str, Any], since: float | None = None) -> tuple[str, str]:
    """succeeded / skipped (its record predates the sweep) / failed (a failure newer than any record, e.g.
    a record made with other settings) / missing."""
    rec, failed = job["record"], job["failed"]
    rec_t = rec.stat().st_mtime if rec.exists() else None
    if failed.exists() and (rec_t is None or failed.stat().st_mtime >= rec_t):
        return "failed", json.loads(failed.read_text()).get("error", "?").splitlines()[0][:160]
    if rec_t is not None:
        return ("succeeded", "") if since is None or rec_t >= since else ("skipped", "record existed before the sweep")
    return "missing", ""


def summarise(jobs: list[dict[str, Any]], since: float | None = None) -> dict[str, list]:
    out: dict[str, list] = {"succeeded": [], "skipped": [], "failed": [], "missing": []}
    for j in jobs:
        s, why = status(j, since)
        out[s].append({"run_id": j["run_id"], "why": why})
    return out


def format_summary(summary: dict[str, list]) -> str:
    lines = ["sweep summary: " + ", ".join(f"{len(v)} {k}" for k, v in summary.items())]
    for k in ("failed", "missing"):
        for item in summary[k]:
            lines.append(f"  {k:9s} {item['run_id']}" + (f"  -- {item['why']}" if item["why"] else ""))
    return "\n".join(lines)


class SummaryCallback(Callback):
    """Hydra callback: after a multirun, print (and save) what succeeded, failed and was skipped."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.start = time.time() - 1.0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            overrides = list(config.hydra.overrides.task)
            summary = summarise(plan(overrides), getattr(self, "start", None))
            text = format_summary(summary)
            print("\n" + text)
            out = Path(config.hydra.sweep.dir) / "sweep_summary.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(summary, indent=2))
        except Exception as e:  # noqa: BLE001 - a summary must never fail the sweep
            print(f"[pyra_bench] could not summarise the sweep: {e}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyra_bench.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["dry-run", "summary"])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as given to `python -m pyra_bench.train -m`")
    a = ap.parse_args(argv)
    jobs = plan(a.overrides)
    if a.command == "dry-run":
        todo = [j for j in jobs if not j["record"].exists() or j["force"]]
        stop = [j for j in jobs if j["conflict"]]
        for j in jobs:
            mark = "run " if j in todo else ("STOP" if j["conflict"] else "skip")
            print(f"{mark}  {j['run_id']:70s} ~{j['gpu_hours']:.2f} GPU-h  {' '.join(j['overrides'])}"
                  + (f"\n      {j['conflict']}" if j["conflict"] else ""))
        hours = sum(j["gpu_hours"] for j in todo)
        print(f"\n{len(jobs)} runs in the sweep, {len(jobs) - len(todo) - len(stop)} already have records (skipped), "
              f"{len(todo)} to run, about {hours:.1f} GPU hours (estimates: see pyra_bench/sweep.py)"
              + (f"; {len(stop)} would STOP: their records were made with other settings (set run_tag or "
                 f"force=true)" if stop else ""))
    else:
        print(format_summary(summarise(jobs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
