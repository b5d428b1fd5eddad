"""Run identity and provenance: what a run is (its id and the settings that change its result) and where
it came from (weights, code revision, software).

- :func:`run_id` names a run: task, backbone, the method's key (its name plus every non-default option
  that changes results, :meth:`Method.run_key`) and a non-default ``peft`` choice, operating point, seed,
  protocol and ``run_tag``. The record
  file, the run folder and the W&B run all take this one id.
- :func:`result_settings` flattens every setting that changes what a run computes (task, backbone,
  method, peft, trainer recipe and options, result-changing callbacks, operating point, seed, protocol and
  the weights' source; what cannot is marked ``execution`` in :mod:`pyra_bench.schema`); a record, a
  finished stage or a checkpoint made with other settings is never taken for this run (:func:`settings_diff`,
  over the union of keys, a missing key read as its schema default).
- :func:`weights_source`, :func:`git_state`, :func:`software_versions`: provenance for the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PROTOCOLS = {  # protocol -> (training split, evaluated split)
    "final": ("train800val200", "test"),  # the VTAB-1k protocol: what the tables report
    "tuning": ("train800", "val200"),     # hyperparameter selection, never touching the test split
}

#: The config sections a run's identity compares (minus what :mod:`pyra_bench.schema` marks execution).
IDENTITY_SECTIONS = ("task", "backbone", "method", "peft", "trainer", "callbacks", "compression", "seed", "protocol")
#: Settings that moved: an older record's key is read under its new name.
MOVED = {"trainer.lora_dropout": "peft.dropout", "trainer.lora_init": "peft.init"}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def is_null(v: Any) -> bool:
    return v in (None, "None", "null", "")


def compression_str(c: Any) -> str:
    """The operating point as it appears in run ids and records (``high``, ``flops-0.4``, ``list-...``)."""
    if isinstance(c, (list, tuple)) or OmegaConf.is_list(c):
        return "list-" + "-".join(str(v) for v in c)
    if OmegaConf.is_dict(c) or isinstance(c, dict):
        return "tome-" + "-".join(f"{k}{v}" for k, v in dict(c).items())
    return str(c).replace(":", "-").replace(",", "_")


def _container(cfg: DictConfig | Mapping) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def method_class(method_cfg: DictConfig | Mapping):
    """The Method class a method config names (registered name, or a ``_target_`` class)."""
    from .methods import method_class as _lookup

    return _lookup(str(method_cfg["name"]), method_cfg.get("_target_"))


def _kwargs(method_cfg: DictConfig | Mapping) -> dict[str, Any]:
    kwargs = method_cfg.get("kwargs") or {}
    return OmegaConf.to_container(kwargs, resolve=True) if OmegaConf.is_config(kwargs) else dict(kwargs)


def method_options(method_cfg: DictConfig | Mapping) -> dict[str, Any]:
    """The method config's result-changing options that differ from the method's defaults."""
    return method_class(method_cfg).result_options(_kwargs(method_cfg))


def method_key(method_cfg: DictConfig | Mapping) -> str:
    """The method's part of the run id (:meth:`Method.run_key`)."""
    return method_class(method_cfg).run_key(_kwargs(method_cfg))


def peft_choice(peft_cfg: Any) -> str:
    """The ``peft`` choice of a config section (``lora``, the default, when absent)."""
    name = (peft_cfg or {}).get("name") if isinstance(peft_cfg, Mapping) or OmegaConf.is_dict(peft_cfg) else None
    return "lora" if is_null(name) else str(name)


def peft_suffix(peft_cfg: Any) -> str:
    """The PEFT choice's part of a run id after the method key: ``+adapter``, ``+vpt``, ``+prefix``; nothing
    for LoRA (the default), so the ids of LoRA runs, older ones included, do not change. Its options are in
    the run's settings (as LoRA's rank is)."""
    name = peft_choice(peft_cfg)
    return "" if name == "lora" else f"+{name}"


def run_id(cfg: DictConfig) -> str:
    """The run's id: ``<task>__<backbone>[-merge_split=..][-merge_site=..]__<method key>[+<peft>]__<operating
    point>__seed<N>[__tune][__<run_tag>]`` (a merge variant or PEFT choice only when not the default)."""
    from .models.variants import variant_suffix

    backbone = str(cfg.backbone.name) + variant_suffix(cfg.backbone)  # non-default merge variants only
    parts = [str(cfg.task.name), backbone, method_key(cfg.method) + peft_suffix(cfg.get("peft")),
             compression_str(cfg.compression), f"seed{int(cfg.seed)}"]
    rid = "__".join(p.replace("/", "_").replace(" ", "") for p in parts)
    protocol = cfg.get("protocol", "final")
    if not is_null(protocol) and protocol != "final":
        rid += f"__{'tune' if protocol == 'tuning' else protocol}"
    tag = cfg.get("run_tag")
    if not is_null(tag):
        rid += "__" + "".join(c if c.isalnum() or c in "-_.=" else "-" for c in str(tag))
    return rid


def flatten(prefix: str, v: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(v, dict):
        for k, x in v.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), x, out)
    else:
        out[prefix] = v
    return out


def _is_execution(key: str) -> bool:
    from .schema import execution_keys

    ex = execution_keys()
    return key in ex or any(key.startswith(p + ".") for p in ex)


def _callbacks(entries: Any) -> dict[str, Any]:
    """The callbacks that can change a result: not null, not ``enabled: false``, neither a callback the schema
    knows cannot (:data:`pyra_bench.schema.EXECUTION_CALLBACKS`) nor one whose entry says ``execution: true``."""
    from .schema import EXECUTION_CALLBACKS

    return {name: e for name, e in (entries or {}).items() if isinstance(e, dict) and e.get("enabled", True)
            is not False and e.get("execution") is not True and e.get("_target_") not in EXECUTION_CALLBACKS}


def result_settings(config: DictConfig | Mapping, weights: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every setting that changes what the run computes, flattened (``trainer.lr``: 0.001, ...): the
    sections :data:`IDENTITY_SECTIONS` minus what the schema marks execution, result-changing callbacks
    included, plus the weights' source under ``weights.*`` when given (:func:`weights_source`)."""
    config = _container(config)
    flat: dict[str, Any] = {}
    for key in IDENTITY_SECTIONS:
        flatten(key, _callbacks(config.get(key)) if key == "callbacks" else config.get(key), flat)
    flat = {k: v for k, v in flat.items() if not _is_execution(k) and not (k == "callbacks" and v is None)}
    if weights is not None:
        flatten("weights", dict(weights), flat)
    return flat


def settings_diff(now: Mapping[str, Any], before: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, before, now) for every setting that differs, over the union of both sides' keys: a key one side
    lacks counts as its schema default (:func:`pyra_bench.schema.defaults`; null for a key the schema does
    not declare, e.g. a Lightning option such as ``trainer.gradient_clip_val``), so a record made before a
    setting was added with a default that reproduces the old behaviour still matches. Keys the schema
    marks execution are not compared; an older record's moved keys (:data:`MOVED`) are read as their new ones."""
    from .schema import defaults

    before = dict(before)
    for old, new in MOVED.items():
        if old in before and new not in before:
            before[new] = before.pop(old)
    dflt = defaults()
    return [(k, before.get(k, dflt.get(k)), now.get(k, dflt.get(k))) for k in sorted(now.keys() | before.keys())
            if not _is_execution(k) and now.get(k, dflt.get(k)) != before.get(k, dflt.get(k))]


def describe_diff(diff: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    shown = "; ".join(f"{k}: {b!r} then, {n!r} now" for k, b, n in diff[:limit])
    return shown + (f"; ... ({len(diff) - limit} more)" if len(diff) > limit else "")


# ---------------------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) in the user cache (weights files are large)."""
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    from .paths import user_cache_dir

    cache = Path(cache_dir or user_cache_dir()) / "sha256"
    memo = cache / key
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest)
    except OSError:
        pass
    return digest


def weights_source(weights: Any, checkpoint: str | None, timm_name: str | None = None) -> dict[str, Any]:
    """Where the backbone's weights came from: ``{"source": "file", "file": name, "sha256": ...}``,
    ``{"source": "hub", "timm_name": ...}`` or ``{"source": "none"}`` (random initialisation)."""
    w = "none" if is_null(weights) else str(weights)
    if checkpoint is not None:
        return {"source": "demo" if w == "demo" else "file", "file": Path(checkpoint).name,
                "sha256": file_sha256(checkpoint)}
    if w == "hub":
        return {"source": "hub", "timm_name": timm_name}
    return {"source": "none"}


def git_state(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The code revision: ``{"rev", "dirty", "diff"}``; untracked (not ignored) files count as dirty and
    are listed in the diff. ``{}`` outside a git checkout."""
    from .paths import PACKAGE_DIR

    root = Path(root or PACKAGE_DIR.parent)

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout

    try:
        if not (root / ".git").exists():
            return {}
        rev = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=normal")
    except (OSError, subprocess.SubprocessError):
        return {}
    dirty = bool(status.strip())
    out: dict[str, Any] = {"rev": rev, "dirty": dirty}
    if dirty:
        try:
            untracked = [ln[3:] for ln in status.splitlines() if ln.startswith("??")]
            out["diff"] = git("diff", "HEAD") + "".join(f"untracked: {u}\n" for u in untracked)
        except (OSError, subprocess.SubprocessError):
            out["diff"] = status
    return out


def software_versions() -> dict[str, str]:
    import lightning
    import timm
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "lightning": lightning.__version__}


def short_hash(*values: Any) -> str:
    """8 hex digits naming a set of values in a run id (``${short_hash:${trainer.lr},${trainer.weight_decay}}``:
    an Optuna trial's ``run_tag``): the SHA-1 of the values as JSON; the values themselves are in the
    run's config and record."""
    return hashlib.sha1(json.dumps(list(values), default=str).encode()).hexdigest()[:8]


def wandb_id(rid: str) -> str:
    """The W&B run id of a run id (stable: a resumed or retried run continues the same W&B run)."""
    return hashlib.sha1(rid.encode()).hexdigest()[:16]


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
