"""Paired comparison of two table rows (e.g. a method against ToMe at the same operating point).

A row's accuracies are ``{task: {seed: top-1}}``. Its summary number is an average over *strata* of tasks:
the VTAB-1k Average is the mean of the three group means (``strata = [natural, specialized, structured]``),
a plain mean over tasks is one stratum. For two rows ``a`` and ``b`` on their common tasks:

* **per-task difference** ``d_t = mean_seeds(a_t) - mean_seeds(b_t)``; the Average difference is the Average
  of the ``d_t`` (the Average is linear, so it equals ``Average(a) - Average(b)``).
* **Bootstrap confidence interval** (percentile, ``confidence`` two-sided) on the Average difference.
  Default ``resample="seeds"``: the 19 tasks are the benchmark, fixed; what varies between repetitions is
  the training randomness, so each replicate resamples, independently in every task, that task's seeds with
  replacement (paired by seed, i.e. the differences ``a_ts - b_ts`` are resampled, when both rows ran the same
  seeds of the task; each row's seeds on their own otherwise). Runs of different tasks are independent, so
  resampling within tasks, not whole seed indices across tasks, is the right unit. It needs >= 2 seeds per
  task in both rows; otherwise (or with ``resample="tasks"``) tasks are resampled within their strata (a
  stratified bootstrap that keeps the Average's group weights), which asks how the difference would vary over
  other tasks like these. With few seeds the percentile interval is narrow (the bootstrap variance of a mean
  of n values is (n-1)/n of the usual estimate): read it as descriptive. The basis is reported with the CI.
* **Wilcoxon signed-rank test** (two-sided, ``scipy.stats.wilcoxon``, zero differences dropped) over the
  per-task differences: do the tasks favour one row?
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Values = Mapping[str, Mapping[int, float]]  # task -> seed -> top-1

RESAMPLING = ("seeds", "tasks")


def stratified_mean(per_task: Mapping[str, float], strata: Sequence[Sequence[str]]) -> float:
    """Mean over strata of the stratum's mean over its tasks (NaN if any task is missing or NaN)."""
    means = []
    for tasks in strata:
        vals = [per_task.get(t, math.nan) for t in tasks]
        if not vals or any(v is None or math.isnan(v) for v in vals):
            return math.nan
        means.append(sum(vals) / len(vals))
    return sum(means) / len(means) if means else math.nan


def per_seed_means(values: Values, strata: Sequence[Sequence[str]]) -> dict[int, float]:
    """The stratified mean of every seed that ran on all tasks of ``strata`` (its spread is the Average's)."""
    tasks = [t for s in strata for t in s]
    if not tasks or any(t not in values for t in tasks):
        return {}
    common = set.intersection(*(set(values[t]) for t in tasks))
    return {s: stratified_mean({t: values[t][s] for t in tasks}, strata) for s in sorted(common)}


def mean_std(xs: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (ddof=1; NaN for one value), n)."""
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if n > 1 else math.nan, n


@dataclass(frozen=True)
class PairedResult:
    per_task: dict[str, float]         # mean_seeds(a) - mean_seeds(b), common tasks
    difference: float                  # the stratified mean of per_task (the Average difference)
    ci: tuple[float, float]            # bootstrap percentile interval on ``difference`` (NaN if impossible)
    basis: str                         # what was resampled, in words ("" when no CI)
    better: int                        # tasks with d_t > 0
    worse: int
    n_tasks: int
    wilcoxon_p: float                  # two-sided, over per_task (NaN when every difference is 0)
    seeds_a: dict[str, int] = field(default_factory=dict)
    seeds_b: dict[str, int] = field(default_factory=dict)


def _percentile_ci(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def _resampled_means(v: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement, same size) of ``v``."""
    return v[rng.integers(0, len(v), (n_resamples, len(v)))].mean(axis=1)


def seed_bootstrap(a: Values, b: Values, strata: Sequence[Sequence[str]], n_resamples: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of the stratified-mean difference, resampling seeds within every task."""
    total = np.zeros(n_resamples)
    for tasks in strata:
        w = 1.0 / (len(strata) * len(tasks))
        for t in tasks:
            sa, sb = a[t], b[t]
            if set(sa) == set(sb):  # the same seeds: resample the paired differences
                keys = sorted(sa)
                total += w * _resampled_means(np.array([sa[k] - sb[k] for k in keys], float), n_resamples, rng)
            else:
                total += w * _resampled_means(np.array(list(sa.values()), float), n_resamples, rng)
                total -= w * _resampled_means(np.array(list(sb.values()), float), n_resamples, rng)
    return total


def task_bootstrap(d: Mapping[str, float], strata: Sequence[Sequence[str]], n_resamples: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of the stratified mean of per-task differences, resampling tasks within strata."""
    total = np.zeros(n_resamples)
    for tasks in strata:
        total += _resampled_means(np.array([d[t] for t in tasks], float), n_resamples, rng)
    return total / len(strata)


def wilcoxon_p(diffs: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``, zeros dropped); NaN if all are 0."""
    from scipy.stats import wilcoxon

    d = [x for x in diffs if x != 0]
    if not d:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(wilcoxon(d).pvalue)


def compare(a: Values, b: Values, strata: Sequence[Sequence[str]] | None = None, resample: str = "seeds",
            n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0) -> PairedResult:
    """Row ``a`` minus row ``b`` on their common tasks (see the module docstring).

    ``strata``: the task groups whose mean of means is the summary (default: one stratum of all common
    tasks); a stratum with a task either row lacks makes the comparison fall back to one stratum of the
    common tasks.
    """
    if resample not in RESAMPLING:
        raise ValueError(f"unknown resample {resample!r}; valid choices: {', '.join(RESAMPLING)}")
    common = [t for t in a if t in b and a[t] and b[t]]
    if strata is None or any(t not in common for s in strata for t in s):
        strata = [common]
    tasks = [t for s in strata for t in s]
    d = {t: float(np.mean(list(a[t].values())) - np.mean(list(b[t].values()))) for t in tasks}
    diff = stratified_mean(d, strata) if tasks else math.nan
    rng = np.random.default_rng(seed)
    ci, basis = (math.nan, math.nan), ""
    few_seeds = any(len(a[t]) < 2 or len(b[t]) < 2 for t in tasks)
    if tasks and resample == "seeds" and not few_seeds:
        paired = sum(set(a[t]) == set(b[t]) for t in tasks)
        ci = _percentile_ci(seed_bootstrap(a, b, strata, n_resamples, rng), confidence)
        basis = "seeds within tasks" + ("" if paired == len(tasks) else f" ({len(tasks) - paired} tasks unpaired)")
    elif len(tasks) >= 2:
        ci = _percentile_ci(task_bootstrap(d, strata, n_resamples, rng), confidence)
        basis = "tasks within groups" if len(strata) > 1 else "tasks"
        if resample == "seeds":
            basis += " (fewer than 2 seeds on some task)"
    return PairedResult(per_task=d, difference=diff, ci=ci, basis=basis,
                        better=sum(v > 0 for v in d.values()), worse=sum(v < 0 for v in d.values()),
                        n_tasks=len(tasks), wilcoxon_p=wilcoxon_p(list(d.values())) if tasks else math.nan,
                        seeds_a={t: len(a[t]) for t in tasks}, seeds_b={t: len(b[t]) for t in tasks})
