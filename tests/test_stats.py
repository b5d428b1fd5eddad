"""Paired comparison statistics (pyra_bench.stats) against scipy's own functions and closed forms, and the
paired table the tables command writes from records."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from scipy import stats as sps

from pyra_bench import paths, tables
from pyra_bench.data.tasks import GROUPS as VTAB_GROUPS
from pyra_bench.records import write_record
from pyra_bench.stats import (
    compare,
    per_seed_means,
    seed_bootstrap,
    stratified_mean,
    task_bootstrap,
    wilcoxon_p,
)

# A fixed example: 8 seeds of two methods on one task.
A = [71.2, 70.4, 72.9, 69.8, 71.7, 73.1, 70.9, 72.0]
B = [70.1, 70.6, 71.0, 69.0, 70.2, 71.8, 70.5, 70.3]
N = 40000


def _scipy_ci(data, statistic, paired=False):
    res = sps.bootstrap(data, statistic, paired=paired, vectorized=True, method="percentile", n_resamples=N,
                        confidence_level=0.95, rng=np.random.default_rng(1))
    return res.confidence_interval.low, res.confidence_interval.high


def test_seed_bootstrap_equals_scipys_paired_bootstrap_on_one_task():
    res = compare({"t": dict(enumerate(A))}, {"t": dict(enumerate(B))}, n_resamples=N, seed=0)
    lo, hi = _scipy_ci((np.array(A), np.array(B)), lambda x, y, axis=-1: np.mean(x - y, axis=axis), paired=True)
    assert res.difference == pytest.approx(np.mean(np.subtract(A, B)))
    assert res.basis == "seeds within tasks"
    # two Monte-Carlo estimates of the same percentiles (the interval is ~1.0 wide)
    assert res.ci[0] == pytest.approx(lo, abs=0.02) and res.ci[1] == pytest.approx(hi, abs=0.02)


def test_unpaired_seeds_are_resampled_per_row_as_scipys_two_sample_bootstrap():
    a, b = {"t": dict(enumerate(A))}, {"t": {10 + i: v for i, v in enumerate(B[:6])}}  # other seeds
    res = compare(a, b, n_resamples=N, seed=0)
    lo, hi = _scipy_ci((np.array(A), np.array(B[:6])),
                       lambda x, y, axis=-1: np.mean(x, axis=axis) - np.mean(y, axis=axis))
    assert "1 tasks unpaired" in res.basis
    assert res.ci[0] == pytest.approx(lo, abs=0.03) and res.ci[1] == pytest.approx(hi, abs=0.03)


def test_task_bootstrap_equals_scipys_bootstrap_over_tasks():
    d = np.subtract(A, B)  # one seed per task: the tasks are resampled
    a = {f"t{i}": {0: A[i]} for i in range(8)}
    b = {f"t{i}": {0: B[i]} for i in range(8)}
    res = compare(a, b, n_resamples=N, seed=0)
    lo, hi = _scipy_ci((d,), lambda x, axis=-1: np.mean(x, axis=axis))
    assert res.basis == "tasks (fewer than 2 seeds on some task)"
    assert res.ci[0] == pytest.approx(lo, abs=0.02) and res.ci[1] == pytest.approx(hi, abs=0.02)


def test_wilcoxon_equals_scipy_and_drops_zero_differences():
    d = [1.5, -0.4, 2.2, 0.9, 0.0, 3.1, -1.2, 0.7, 1.1]
    assert wilcoxon_p(d) == pytest.approx(sps.wilcoxon([x for x in d if x]).pvalue)
    assert wilcoxon_p(d) == pytest.approx(sps.wilcoxon(d, zero_method="wilcox").pvalue)
    assert math.isnan(wilcoxon_p([0.0, 0.0]))


def test_stratified_seed_bootstrap_has_the_closed_form_spread():
    """Seeds resampled independently within each task: Var = sum_t w_t^2 var_pop(d_t) / n_t (w_t = 1 /
    (strata x stratum size)), the variance of a mean of n draws with replacement."""
    rng = np.random.default_rng(3)
    strata = [["a", "b", "c"], ["d"], ["e", "f"]]
    tasks = [t for s in strata for t in s]
    da = {t: dict(enumerate(rng.normal(70, 2, size=3 + i % 2))) for i, t in enumerate(tasks)}
    db = {t: {k: v - rng.normal(1, 1) for k, v in da[t].items()} for t in tasks}
    boot = seed_bootstrap(da, db, strata, 200000, np.random.default_rng(0))
    var = 0.0
    for s in strata:
        for t in s:
            d = np.array([da[t][k] - db[t][k] for k in sorted(da[t])])
            var += (1 / (len(strata) * len(s))) ** 2 * d.var() / len(d)
    mean_d = {t: np.mean([da[t][k] - db[t][k] for k in da[t]]) for t in tasks}
    assert boot.mean() == pytest.approx(stratified_mean(mean_d, strata), abs=0.01)
    assert boot.std() == pytest.approx(math.sqrt(var), rel=0.01)
    tb = task_bootstrap(mean_d, strata, 200000, np.random.default_rng(0))  # resample tasks within strata
    tvar = sum(np.var([mean_d[t] for t in s]) / len(s) for s in strata) / len(strata) ** 2
    assert tb.std() == pytest.approx(math.sqrt(tvar), rel=0.01)


def test_per_seed_means_use_the_seeds_every_task_ran():
    values = {"a": {0: 1.0, 1: 3.0, 2: 5.0}, "b": {0: 2.0, 1: 4.0}, "c": {0: 10.0, 1: 20.0}}
    strata = [["a", "b"], ["c"]]
    assert per_seed_means(values, strata) == {0: pytest.approx((1.5 + 10) / 2), 1: pytest.approx((3.5 + 20) / 2)}
    assert per_seed_means(values, [["a", "missing"]]) == {}
    assert math.isnan(stratified_mean({"a": 1.0}, [["a", "b"]]))


def test_compare_refuses_an_unknown_resampling():
    with pytest.raises(ValueError, match="unknown resample 'jackknife'; valid choices: seeds, tasks"):
        compare({"t": {0: 1.0}}, {"t": {0: 2.0}}, resample="jackknife")


def _records(folder, method, acc, schedule="high", label=None):
    for (task, seed), a in acc.items():
        write_record(folder, {"run_id": f"{task}__{method}__{schedule}__{seed}", "status": "completed", "task": task,
                              "backbone": "vit_b16_in21k", "method": method, "method_options": {},
                              "method_key": method, "method_label": label, "schedule": schedule, "seed": seed,
                              "metrics": {"test_top1": a}})


def test_the_paired_table_from_records_equals_scipy_and_a_hand_computation(tmp_path):
    rng = np.random.default_rng(7)
    mine = {(t, s): float(rng.uniform(50, 90)) for t in tables.TASKS for s in (0, 1)}
    tome = {(t, s): v - float(rng.normal(0.8, 1.5)) for (t, s), v in mine.items()}
    peft = {(t, s): v + 1.0 for (t, s), v in mine.items()}
    _records(tmp_path, "plugmethod", mine, label="PlugMethod")
    _records(tmp_path, "tome", tome)
    _records(tmp_path, "peft", peft, "none")
    with initialize_config_dir(config_dir=str(paths.CONF_DIR), version_base="1.3"):
        cfg = compose("tables", overrides=[f"records={tmp_path}", f"out={tmp_path / 'out'}", "figures=false",
                                           "tables=[3]", "paired.n_resamples=2000", "+paired.also.plugmethod=[peft]"])
    tables.run(cfg)
    paired = pd.read_csv(tmp_path / "out" / "paired.csv").set_index("Comparison")
    row = paired.loc["PlugMethod − ToMe"]
    d = {t: np.mean([mine[t, s] - tome[t, s] for s in (0, 1)]) for t in tables.TASKS}
    groups = [VTAB_GROUPS[g] for g in ("natural", "specialized", "structured")]
    avg = np.mean([np.mean([d[t] for t in g]) for g in groups])
    assert row["Difference"] == pytest.approx(avg) and row["Over"] == "Average"
    assert row["Wilcoxon p"] == pytest.approx(sps.wilcoxon(list(d.values())).pvalue)
    assert row["Better on"] == sum(v > 0 for v in d.values()) and row["Tasks"] == 19
    assert row["CI low"] < avg < row["CI high"] and row["CI over"] == "seeds within tasks"
    assert f"PlugMethod − ToMe (ViT-B/16, high): {avg:+.2f} [" in row["Sentence"]
    assert f"better on {row['Better on']} of 19 tasks" in row["Sentence"]
    # a reference with no records at the operating point is taken uncompressed (PEFT)
    assert paired.loc["PlugMethod − PEFT", "Difference"] == pytest.approx(-1.0)
    per_task = pd.read_csv(tmp_path / "out" / "paired_tasks.csv").set_index("Comparison")
    assert per_task.loc["PlugMethod − ToMe", "DTD"] == pytest.approx(d["dtd"])
    assert "ToMe − ToMe" not in paired.index and "PEFT − ToMe" not in paired.index
