"""Run records: one JSON file per run, written atomically, read back by the tables and the sweeps.

Schema (``schema: 1``). Fields that a run did not measure are absent or null, never zero::

    {
      "schema": 1,
      "run_id": "cifar100__vit_b16_in21k__pyra__high__seed0",
      "status": "completed",                 # or "failed" (with "error")
      "task": "cifar100", "group": "natural",   # natural | specialized | structured | demo
      "task_label": "Cifar100",                 # the task config's display: the tables' column title
      "backbone": "vit_b16_in21k",
      "method": "pyra", "method_key": "pyra-wd_sigmoid", "method_label": "PYRA",
      "method_options": {"variant": "wd_sigmoid"},   # result-changing options that differ from the defaults
      "backbone_label": "ViT-B/16", "run_tag": null,
      "schedule": "high",                      # schedule name / description; "none" for no compression
      "seed": 0,
      "data_format": "jpeg_folder",            # how the images were read (jpeg_folder | tfds | embedded)
      "protocol": "final",                     # final (train800val200 -> test) | tuning (train800 -> val200)
      "eval_protocol": {"evaluation": "every_n", "eval_every": 10, "evaluated_epochs": [10, 20, ...]},
      "weights": {"source": "file", "file": "ViT-B_16.npz", "sha256": "..."},   # or hub / none / demo
      "settings": {"trainer.lr": 0.001, ...},  # every result-changing setting, compared before a run is skipped
      "metrics": {                             # tuning runs carry val_* instead and test_top1 null
        "test_top1": 72.1,                     # the reported number: last epoch (VTAB protocol)
        "test_top1_best": 72.9,                # max over evaluated epochs (the paper's convention, labelled)
        "test_top1_by_epoch": {"0": 5.1, "10": 60.2, ...},
        "test_images": 10000,                  # images behind the last evaluation (the whole split)
        "val_top1": null
      },
      "training_cost": {"train": {"img_per_s": 512.0, "peak_mem_gib": 9.1, ...}},   # per trained stage
      "params": {"trainable": 399652, "paper_counted": 304320, "backbone": 85798656,
                 "paper_pct": 0.3547},       # % of backbone params, counted as the paper counts
      "flops": {"gmacs": 5.07, "paper_gflops": 4.75, "tokens_per_block": [...]},
      "throughput": {"img_per_s": 1365.0, "device": "NVIDIA ...", "batch_size": 512, "dtype": "float32"},
      "config": {...resolved Hydra config...},
      "data": {...data provenance...}, "overrides": ["task=cifar100", ...],   # the command line
      "git_rev": "abc123+dirty", "git": {"rev": ..., "dirty": true},   # the diff: <run_id>.git.diff beside it
      "created": "2026-11-24T12:00:00Z", "versions": {"torch": ..., "timm": ...}
    }
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


#: What a sweep's job returns to its sweeper (``optimized_metric``, conf/hparams_search/optuna.yaml): the
#: top-1 of the last evaluated epoch (the VTAB protocol) or the best evaluated epoch's, on the split the
#: run evaluates (val200 under the tuning protocol, test otherwise).
OPTIMIZED_METRICS = ("top1", "top1_best")


def objective(record: dict[str, Any], metric: str = "top1") -> float | None:
    """The record's ``optimized_metric`` (:data:`OPTIMIZED_METRICS`): ``<split>_<metric>`` of its metrics."""
    m = record.get("metrics") or {}
    split = "test" if m.get("test_top1") is not None else "val"
    return m.get(f"{split}_{metric}")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically, with the user's umask (:func:`pyra_bench.fileio.atomic_write_text`)."""
    from .fileio import atomic_write_text as write

    return write(path, text)


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON to ``path`` atomically (:func:`atomic_write_text`)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_record(results_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    record = {"schema": SCHEMA_VERSION, **record}
    if "run_id" not in record:
        raise ValueError("a run record needs a run_id")
    return atomic_write_json(Path(results_dir) / f"{record['run_id']}.json", record)


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        rec = json.load(f)
    if rec.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: unsupported run-record schema {rec.get('schema')!r} (expected {SCHEMA_VERSION})")
    return rec


def iter_records(paths: Iterable[str | os.PathLike], status: str | None = "completed") -> list[dict[str, Any]]:
    """Load every ``*.json`` record found in the given files/folders (recursively); skip temp files.

    A file that is not a run record (unreadable JSON, a JSON list, another schema) is never fatal and never
    skipped silently: one ``UserWarning`` names and counts them."""
    import warnings

    out, bad = [], []
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(p.rglob("*.json"))
        for f in files:
            if f.name.startswith("."):
                continue
            try:
                rec = read_record(f)
            except AttributeError:  # valid JSON, but not an object
                bad.append(f"{f} (not a JSON object)")
                continue
            except (OSError, ValueError) as e:  # unreadable, not JSON (JSONDecodeError), or another schema
                why = str(e).removeprefix(f"{f}: ")
                bad.append(f"{f} ({'not valid JSON: ' if isinstance(e, json.JSONDecodeError) else ''}{why})")
                continue
            if status is None or rec.get("status") == status:
                rec.setdefault("_path", str(f))
                out.append(rec)
    if bad:
        warnings.warn(f"{len(bad)} file(s) that are not run records were not read: {'; '.join(bad[:20])}"
                      + (f"; ... and {len(bad) - 20} more" if len(bad) > 20 else ""), stacklevel=2)
    return out
