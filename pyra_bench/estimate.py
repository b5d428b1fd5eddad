"""GPU hours of a planned run, from what finished runs measured (``python -m pyra_bench.sweep dry-run``).

    hours, basis = gpu_hours(cfg, records)      # cfg: a composed run config; records: iter_records(...)

A run costs ``sum over stages(epochs x training images / training img/s)`` plus ``evaluations x evaluated
images / evaluation img/s``: 1,000 training images (train800val200; 800 under ``protocol=tuning``) and the
task's test split (val200 under tuning) at every evaluation (every ``trainer.eval_every`` epochs and after
the last, in the stages that evaluate). The speeds come, best first, from:

1. records of the same backbone and method (same operating point preferred): each stage's training
   throughput *with data loading* (``training_cost``) and the inference throughput (``throughput``, else
   three times the training throughput: a forward pass is about a third of a training step);
2. records of the same backbone and another method, scaled by the methods' ``cost_factor`` (a class
   attribute: training cost per image relative to plain LoRA, default 1.0);
3. the paper's RTX 3090 inference throughput of the backbone (``results/paper/paper_tables.csv``), training
   at a third of it times ``cost_factor``: a labelled fallback, not a measurement.

The test split size is the records' ``test_images`` of the task, else its TFDS split sizes. ``basis`` says
which of these the number rests on; with nothing to go on the hours are NaN and ``basis`` says why.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

FORWARD_SHARE = 3.0  # a training step (forward + backward + update) ~ 3 forward passes
TRAIN_IMAGES = {"final": 1000, "tuning": 800}
EVAL_SPLIT = {"final": "test", "tuning": "val200"}


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    cur = cfg
    for k in dotted.split("."):
        if cur is None:
            return default
        cur = cur.get(k) if hasattr(cur, "get") else getattr(cur, k, None)
    return default if cur is None else cur


def _kwargs(cfg: Any) -> dict[str, Any]:
    kw = _get(cfg, "method.kwargs") or {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(kw):
            return OmegaConf.to_container(kw, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(kw)


def _method_cls(cfg: Any):
    from .errors import InputError
    from .methods import method_class

    try:
        return method_class(str(_get(cfg, "method.name")), _get(cfg, "method._target_"))
    except InputError:
        return None


def cost_factor(cls: Any) -> float:
    """A method class's training cost per image relative to plain LoRA (``cost_factor``, default 1.0)."""
    try:
        return float(getattr(cls, "cost_factor", 1.0) or 1.0)
    except (TypeError, ValueError):
        return 1.0


def _stages(cfg: Any, cls: Any) -> list[tuple[str, int, bool]]:
    """(name, epochs, evaluates) of each stage of the planned run."""
    epochs = int(_get(cfg, "trainer.epochs", 100))
    stages = None
    if cls is not None:
        try:
            stages = cls(schedule=_get(cfg, "compression", "none"), **_kwargs(cfg)).stages()
        except Exception:  # noqa: BLE001 - a method the run itself would refuse: estimate one stage
            stages = None
    if not stages:
        return [("train", epochs, True)]
    return [(s.name, max(1, round(epochs * s.epochs_fraction)) if s.epochs_fraction > 0 else 0, s.evaluate)
            for s in stages]


def _evaluations(cfg: Any, stages: list[tuple[str, int, bool]]) -> int:
    if str(_get(cfg, "trainer.evaluation", "every_n")) == "final":
        return 1
    every = int(_get(cfg, "trainer.eval_every", 0) or 0)
    n = 0
    for i, (_, e, evaluates) in enumerate(stages):
        if not evaluates or e == 0:
            continue
        k = e // every if every > 0 else 0
        n += k + (1 if (i == len(stages) - 1 and (every <= 0 or e % every)) else 0)
    return max(n, 1)


_SLICE = re.compile(r"^(\w+)(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?$")


def split_size(split: str, sizes: Mapping[str, int]) -> int | None:
    """Images in a resolved TFDS split string (``"train[663552:]"``, ``"test[50%:]"``, ``a+b``)."""
    total = 0
    for part in split.split("+"):
        m = _SLICE.match(part.strip())
        if not m or m.group(1) not in sizes:
            return None
        n = int(sizes[m.group(1)])
        if m.group(2) is None:
            total += n
            continue

        def bound(v: str, pct: str, default: int, n: int = n) -> int:
            if v == "":
                return default
            b = int(v) * n // 100 if pct else int(v)
            return b + n if b < 0 else b

        total += max(0, min(n, bound(m.group(4), m.group(5), n)) - max(0, bound(m.group(2), m.group(3), 0)))
    return total


def _eval_images(cfg: Any, records: list[dict], protocol: str) -> tuple[int | None, str]:
    task = str(_get(cfg, "task.name"))
    if protocol == "tuning":
        return 200, "val200"
    seen = [int(r["metrics"]["test_images"]) for r in records if r.get("task") == task
            and (r.get("metrics") or {}).get("test_images")]
    if seen:
        return int(statistics.median(seen)), "test split (records)"
    try:
        from .data.tasks import get_task

        spec = get_task(task)
        if spec.test and spec.reference_sizes:
            n = split_size(spec.resolve_splits(spec.reference_sizes)["test"], spec.reference_sizes)
            if n:
                return n, "test split (TFDS sizes)"
    except Exception:  # noqa: BLE001 - a task unknown here (e.g. a custom folder task): no size
        pass
    return None, "test split size unknown"


def _median(xs: Iterable[float | None]) -> float | None:
    vals = [float(x) for x in xs if x]
    return statistics.median(vals) if vals else None


def _speeds(recs: list[dict]) -> tuple[dict[str, float], float | None, float | None, set[str]]:
    """(training img/s per stage, all stages' median, inference img/s, devices) from records."""
    per_stage: dict[str, list[float]] = {}
    devices = set()
    for r in recs:
        for stage, c in (r.get("training_cost") or {}).items():
            if (c or {}).get("img_per_s"):
                per_stage.setdefault(stage, []).append(float(c["img_per_s"]))
                if c.get("device"):
                    devices.add(str(c["device"]))
    stage_med = {s: statistics.median(v) for s, v in per_stage.items()}
    overall = _median(x for v in per_stage.values() for x in v)
    infer = _median((r.get("throughput") or {}).get("img_per_s") for r in recs)
    return stage_med, overall, infer, devices


def _paper_throughput(backbone: str, method: str, schedule: str) -> tuple[float | None, str]:
    try:
        from . import paths
        from .tables import load_paper

        p = load_paper(paths.PAPER_CSV)
    except Exception:  # noqa: BLE001 - no paper numbers: no fallback
        return None, ""
    tp = p[(p.backbone == backbone) & (p.column == "throughput")]
    exact = tp[(tp.method == method) & (tp.schedule == schedule)]
    if len(exact):
        return float(exact.value.iloc[0]), f"{method}/{schedule}"
    plain = tp[tp.schedule == "none"]
    if len(plain):
        return float(plain.value.iloc[0]), "uncompressed"
    return None, ""


def gpu_hours(cfg: Any, records: Iterable[dict]) -> tuple[float, str]:
    """Estimated GPU hours of the run ``cfg`` would start, and what the estimate rests on."""
    records = [r for r in records if r.get("status", "completed") == "completed"]
    backbone, method = str(_get(cfg, "backbone.name")), str(_get(cfg, "method.name"))
    schedule = str(_get(cfg, "compression", "none"))
    protocol = str(_get(cfg, "protocol", "final"))
    cls = _method_cls(cfg)
    stages = _stages(cfg, cls)
    n_eval = _evaluations(cfg, stages)
    eval_imgs, eval_what = _eval_images(cfg, records, protocol)
    train_imgs = TRAIN_IMAGES.get(protocol, 1000)

    same = [r for r in records if r.get("backbone") == backbone and r.get("method") == method]
    same_point = [r for r in same if str(r.get("schedule")) == schedule]
    scale, basis = 1.0, ""
    for cands, what in ((same_point, f"{backbone}/{method}/{schedule}"), (same, f"{backbone}/{method}")):
        stage_ips, overall, infer, devices = _speeds(cands)
        if overall:
            basis = f"measured: {len(cands)} record(s) of {what}"
            break
    else:
        others = [r for r in records if r.get("backbone") == backbone and _speeds([r])[1]]
        if others:
            from .methods import METHODS

            stage_ips, overall, infer, devices = _speeds(others)
            factors = [cost_factor(METHODS.get(r["method"])) if r.get("method") in METHODS else 1.0 for r in others]
            scale = statistics.median(factors) / cost_factor(cls)
            stage_ips = {}  # another method's stages are not this one's
            infer = None    # nor is its inference speed
            basis = (f"scaled: {len(others)} record(s) of other methods on {backbone}, x {scale:.2f} "
                     f"(cost_factor)")
        else:
            tp, which = _paper_throughput(backbone, method, schedule)
            if tp is None:
                return math.nan, (f"unknown: no records of {backbone} and no published throughput for it "
                                  f"(run one job first; its record makes the estimate)")
            own = str(which).startswith(f"{method}/")  # the method's own published speed: no factor
            stage_ips, overall, infer, devices = {}, tp / FORWARD_SHARE / (1.0 if own else cost_factor(cls)), tp, set()
            basis = (f"fallback (no records of {backbone}): the paper's RTX 3090 inference throughput "
                     f"({which}, {tp:.0f} img/s), training at 1/{FORWARD_SHARE:.0f} of it / cost_factor")
    if not infer:
        infer = FORWARD_SHARE * overall * scale
        basis += "; evaluation at 3x the training speed"
    seconds = sum(e * train_imgs / (stage_ips.get(name, overall) * scale) for name, e, _ in stages)
    if eval_imgs is None:
        basis += f"; {eval_what}, evaluation not counted"
    else:
        seconds += n_eval * eval_imgs / infer
    dev = f" on {'; '.join(sorted(devices))}" if devices else ""
    detail = (f"{sum(e for _, e, _ in stages)} epochs x {train_imgs} images"
              + (f" + {n_eval} evaluations x {eval_imgs} images ({eval_what})" if eval_imgs else ""))
    return seconds / 3600.0, f"{basis}{dev}; {detail}"
