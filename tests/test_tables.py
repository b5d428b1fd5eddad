"""Tables from run records: the paper's numbers reproduce its printed Averages, every setting the records hold
is a row of its own (mean +- std over seeds), and the outputs (Markdown, CSV, LaTeX, the CLI) are right."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from pyra_bench import paths, tables
from pyra_bench.data.tasks import GROUPS as VTAB_GROUPS
from pyra_bench.errors import InputError
from pyra_bench.records import iter_records, write_record
from pyra_bench.stats import stratified_mean

ROOT = Path(__file__).resolve().parents[1]
PAPER_TXT = next((p / "shared" / "paper" / "pyra_eccv2024.txt" for p in ROOT.parents
                  if (p / "shared" / "paper" / "pyra_eccv2024.txt").exists()), ROOT / "missing")
BB = "vit_b16_in21k"


def _paper():
    return tables.load_paper()


def _tables(records, out, *overrides):
    with initialize_config_dir(config_dir=str(paths.CONF_DIR), version_base="1.3"):
        cfg = compose("tables", overrides=[f"records={records}", f"out={out}", "figures=false",
                                           "paired.n_resamples=500", *overrides])
    return tables.run(cfg)


def _record(task, acc, method="tome", schedule="high", seed=0, backbone=BB, **extra):
    rid = "__".join([task, backbone, extra.get("method_key", method), str(extra.get("variant")), schedule,
                     f"seed{seed}", str(extra.get("run_tag") or "")])
    return {"run_id": rid, "status": "completed", "task": task, "backbone": backbone, "method": method,
            "schedule": schedule, "seed": seed, "metrics": {"test_top1": acc}, **extra}


def _rec(folder, task, acc, method="tome", schedule="high", seed=0, backbone=BB, **extra):
    return write_record(folder, _record(task, acc, method, schedule, seed, backbone, **extra))


def _paper_table(records, table):
    """Table ``table`` built in-process from record dicts, as ``tables.build`` builds it (best marked)."""
    groups, problems = tables.group_records(records)
    assert problems == []
    prows = tables.paper_rows(_paper())
    extras, _ = tables.place_extras(groups, prows)
    t = tables.build_paper_table(table, prows[table], groups, extras.get(table, {}), "test")
    t.mark_best()
    return t, groups


def _write_paper_as_records(folder, table, drop=()):
    p = _paper()
    pt = p[(p.table == table) & p.column.isin(tables.TASKS)]
    n = 0
    for (bb, method, variant, schedule), g in pt.groupby(["backbone", "method", "variant", "schedule"]):
        for _, r in g.iterrows():
            if (bb, method, r.column) in drop:
                continue
            # records from before method_options existed: the old "variant" field
            _rec(folder, r.column, r.value, method, schedule, backbone=bb, variant=variant or None,
                 method_key=f"{method}-{variant}", params={"paper_pct": 0.34})
            n += 1
    return n


def _row(df, method, backbone="ViT-B/16"):
    rows = df[(df.Method == method) & (df.Backbone == backbone)]
    assert len(rows) == 1, (method, backbone, df[["Method", "Backbone"]])
    return rows.iloc[0]


@pytest.mark.parametrize("table", ["2", "3"])
def test_paper_numbers_reproduce_the_printed_average(tmp_path, table):
    assert _write_paper_as_records(tmp_path, table) == 12 * 19
    out = tmp_path / "out"
    _tables(tmp_path, out, f"tables=[{table}]")
    cmp = pd.read_csv(out / f"table{table}_vs_paper.csv")
    avg = cmp[cmp.Column == "Average"]
    assert len(avg) == 12 and avg.measured.notna().all()
    # mean of the three group means, as the paper computes it (a flat 19-task mean misses by ~2 points)
    assert (avg["diff"].abs() <= 0.02).all(), avg[avg["diff"].abs() > 0.02]
    assert (cmp[cmp.Column.isin(tables.TASK_LABELS)]["diff"].abs() < 1e-9).all()
    md = (out / f"table{table}.md").read_text()
    assert "PYRA" in md and ("PEFT* (ViT-S/16)" in md if table == "3" else "PEFT" in md)
    assert "not in the paper" not in md  # every group of these records is a paper row
    assert (out / f"table{table}.tex").read_text().count("\\begin{tabular}") == 1


def test_flat_mean_would_not_reproduce_the_paper():
    """Guards the test above: the Average really is the mean of group means."""
    p = _paper()
    row = p[(p.table == "2") & (p.backbone == BB) & (p.method == "peft")]
    vals = dict(zip(row.column, row.value))
    flat = sum(vals[t] for t in tables.TASKS) / 19
    assert abs(flat - vals["average"]) > 1.0
    assert abs(stratified_mean(vals, tables.STRATA) - vals["average"]) <= 0.01


def test_missing_task_shows_as_missing_not_zero(tmp_path):
    _write_paper_as_records(tmp_path, "2", drop={(BB, "pyra", "dtd")})
    out = tmp_path / "out"
    _tables(tmp_path, out, "tables=[2]")
    row = _row(pd.read_csv(out / "table2.csv"), "PYRA")
    assert math.isnan(row["DTD"]) and math.isnan(row["Natural"]) and math.isnan(row["Average"])
    assert not math.isnan(row["Specialized"]) and row["Tasks"] == "18/19"
    assert "—" in (out / "table2.md").read_text()


def test_metric_best_and_the_spread_over_seeds(tmp_path):
    for seed, (last, best) in enumerate([(50.0, 60.0), (70.0, 80.0)]):
        for task in tables.TASKS:
            _rec(tmp_path, task, last, seed=seed, metrics={"test_top1": last, "test_top1_best": best})
    for metric, mean in (("last", 60.0), ("best", 70.0)):
        groups, _ = tables.group_records(iter_records([tmp_path]), metric)
        (g,) = groups.values()
        c = g.mean_cell(tables.STRATA)
        assert c.mean == pytest.approx(mean) and c.n == 2
        assert c.std == pytest.approx(np.std([mean - 10, mean + 10], ddof=1))
        s = tables.summarise(tables.records_frame(iter_records([tmp_path]), metric)).iloc[0]  # the frame API
        assert s["average"] == pytest.approx(mean) and s["n_runs"] == 38 and s["average_n"] == 2


def test_two_settings_of_one_method_are_two_rows_never_one_average(tmp_path):
    """The issue's example: 68.4 and 10.0 became 39.2. A result-changing option keeps them apart."""
    _rec(tmp_path, "cifar100", 68.4, "pyra", method_key="pyra", method_options={})
    _rec(tmp_path, "cifar100", 10.0, "pyra", method_key="pyra-wr_init=zeros", method_options={"wr_init": "zeros"})
    out = tmp_path / "out"
    _tables(tmp_path, out, "tables=[3]")
    t = pd.read_csv(out / "table3.csv")
    assert _row(t, "PYRA")["Cifar100"] == pytest.approx(68.4)
    extra = _row(t, "PYRA (wr_init=zeros)")
    assert extra["Cifar100"] == pytest.approx(10.0) and extra["Note"] == "not in the paper"
    assert not np.isclose(t["Cifar100"].dropna(), 39.2).any()


def test_a_new_method_is_a_row_of_its_own_with_mean_and_std_over_seeds(tmp_path):
    rng = np.random.default_rng(0)
    acc = {(t, s): float(rng.uniform(40, 90)) for t in tables.TASKS for s in (0, 1, 2)}
    for (t, s), a in acc.items():
        _rec(tmp_path, t, a, "notinpkg", "low", seed=s, method_key="notinpkg", method_options={},
             method_label="NotInPkg", throughput={"img_per_s": 700.0})
    out = tmp_path / "out"
    _tables(tmp_path, out, "tables=[2,3]")
    row = _row(pd.read_csv(out / "table2.csv"), "NotInPkg")
    assert row["Block"] == "ViT-B/16" and row["Note"] == "not in the paper" and row["Throughput"] == 700
    dtd = [acc["dtd", s] for s in range(3)]
    assert row["DTD"] == pytest.approx(np.mean(dtd)) and row["DTD std"] == pytest.approx(np.std(dtd, ddof=1))
    # the Average's spread is the std of the three per-seed Averages (mean of the group means), by hand:
    groups = [VTAB_GROUPS[g] for g in ("natural", "specialized", "structured")]
    per_seed = [np.mean([np.mean([acc[t, s] for t in g]) for g in groups]) for s in range(3)]
    assert row["Average"] == pytest.approx(np.mean(per_seed))
    assert row["Average std"] == pytest.approx(np.std(per_seed, ddof=1)) and row["Average n"] == 3
    assert "NotInPkg" not in pd.read_csv(out / "table3.csv").Method.tolist()  # its operating point is "low"
    md = (out / "table2.md").read_text()
    assert f"{np.mean(dtd):.1f} ± {np.std(dtd, ddof=1):.1f}" in md and "over 3 seeds" in md


def test_seed_counts_that_differ_across_cells_are_shown(tmp_path):
    for s in (0, 1, 2):
        _rec(tmp_path, "cifar100", 60.0 + s, seed=s)
    for s in (0, 1):
        _rec(tmp_path, "dtd", 50.0 + s, seed=s)
    out = tmp_path / "out"
    _tables(tmp_path, out, "tables=[3]")
    md = (out / "table3.md").read_text()
    assert "61.0 ± 1.0 |" in md and "50.5 ± 0.7 (n=2)" in md and "(n=k): an entry over k seeds" in md


def test_ablation_rows_come_from_the_variant_option(tmp_path):
    """Tables 6-8 map their rows by ``method_options["variant"]``; old records' ``variant`` still works; the
    "# params" column is the token-modulation count in K, ours beside the paper's."""
    for t in tables.TASKS:
        _rec(tmp_path, t, 71.0, "pyra", method_key="pyra-wd", method_options={"variant": "wd"},
             params={"method_paper": 9216, "paper_pct": 0.35})
        _rec(tmp_path, t, 70.0, "pyra", variant="wr", params={"method_paper": 192})  # an old record
        _rec(tmp_path, t, 72.0, "pyra", method_key="pyra", method_options={}, params={"method_paper": 9408})
    out = tmp_path / "out"
    _tables(tmp_path, out, "tables=[3,6]")
    t6 = pd.read_csv(out / "table6.csv")
    by = t6.set_index("Method")
    assert by.loc["Plain W_D", "Average"] == pytest.approx(71.0) and by.loc["Plain W_r", "Average"] == pytest.approx(70.0)
    assert by.loc["PYRA", "Average"] == pytest.approx(72.0) and math.isnan(by.loc["Baseline (ToMe)", "Average"])
    assert by.loc["Plain W_D", "# params"] == pytest.approx(9.216) and by.loc["Plain W_D", "# params (paper)"] == 8.45
    md = (out / "table6.md").read_text()
    assert re.search(r"\| Plain W_D +\| 9.22K +\| 8.45K", md) and re.search(r"\| PYRA +\| 9.41K +\| 8.64K", md)
    assert (t6.Note.fillna("") == "").all()
    assert "PYRA (variant=wd)" not in pd.read_csv(out / "table3.csv").Method.tolist()  # it is Table 6's row
    tex = (out / "table6.tex").read_text()
    assert r"Plain $W_D$" in tex and r"$\sigma(\cdot)$ \& $W_r$" in tex
    cmp = pd.read_csv(out / "table6_vs_paper.csv")
    k = cmp[(cmp.Method == "Plain W_D") & (cmp.Column == "# params (K)")].iloc[0]
    assert k.measured == pytest.approx(9.216) and k.paper == pytest.approx(8.45)


def test_vs_paper_compares_params_and_throughput(tmp_path):
    for t in tables.TASKS:
        _rec(tmp_path, t, 70.0, "peft", "none", params={"paper_pct": 0.3437}, throughput={"img_per_s": 400.0})
    out = tmp_path / "out"
    _tables(tmp_path, out, "tables=[2]")
    cmp = pd.read_csv(out / "table2_vs_paper.csv")
    peft = cmp[(cmp.Method == "PEFT") & (cmp.Backbone == "ViT-B/16")].set_index("Column")
    assert peft.loc["Throughput", "paper"] == 425.0 and peft.loc["Throughput", "diff"] == pytest.approx(-25.0)
    assert peft.loc["# params (%)", "paper"] == 0.34 and peft.loc["# params (%)", "measured"] == pytest.approx(0.3437)
    assert "Throughput" in (out / "table2_vs_paper.md").read_text()


def test_other_tasks_and_other_operating_points_get_tables_of_their_own(tmp_path):
    for s in (0, 1):
        _rec(tmp_path, "digits", 80.0 + s, "pyra", "low", seed=s, backbone="vit_demo_mnist", group="demo")
        _rec(tmp_path, "my_folder_task", 60.0, "pyra", "low", seed=s, backbone="vit_demo_mnist", group="custom")
    _rec(tmp_path, "cifar100", 55.0, "tome", "r8")
    out = tmp_path / "out"
    _tables(tmp_path, out, "tables=[2,3]")
    demo = pd.read_csv(out / "other_tasks_demo.csv")
    assert demo.iloc[0]["Digits (sklearn)"] == pytest.approx(80.5) and demo.iloc[0]["Mean"] == pytest.approx(80.5)
    assert pd.read_csv(out / "other_tasks_custom.csv").iloc[0]["my_folder_task"] == pytest.approx(60.0)
    pts = pd.read_csv(out / "other_points.csv")
    assert pts.iloc[0]["Block"] == "ViT-B/16, r8" and pts.iloc[0]["Cifar100"] == pytest.approx(55.0)
    for t in ("2", "3"):
        assert set(pd.read_csv(out / f"table{t}.csv").Note.fillna("")) == {""}


def test_display_name_comes_from_the_method_class(tmp_path):
    from pyra_bench.methods import METHODS, Method

    class Fancy(Method):
        name = "fancy_for_test"
        display_name = "Fancy (ours)"

    METHODS.add("fancy_for_test", Fancy)
    try:
        _rec(tmp_path, "dtd", 50.0, "fancy_for_test", method_label="stale label")
        _rec(tmp_path, "dtd", 40.0, "labelled_only", method_label="Labelled")
        _rec(tmp_path, "dtd", 30.0, "bare")
        out = tmp_path / "out"
        _tables(tmp_path, out, "tables=[3]")
        methods = pd.read_csv(out / "table3.csv").Method.tolist()
        assert {"Fancy (ours)", "Labelled", "bare"} <= set(methods) and "stale label" not in methods
    finally:
        METHODS._items.pop("fancy_for_test")


def test_files_that_are_not_records_are_named_in_a_warning(tmp_path, capsys):
    runs = tmp_path / "runs"
    _rec(runs, "dtd", 50.0)
    (runs / "a_list.json").write_text("[1, 2]")
    (runs / "broken.json").write_text('{"run_id": ')
    (runs / "other_schema.json").write_text('{"schema": 99, "run_id": "x"}')
    out = tmp_path / "out"
    _tables(runs, out, "tables=[3]")
    err = capsys.readouterr().err
    assert "3 file(s) that are not run records were not read" in err
    for name in ("a_list.json (not a JSON object)", "broken.json (not valid JSON", "other_schema.json (unsupported"):
        assert name in err
    assert pd.read_csv(out / "table3.csv").pipe(lambda t: _row(t, "ToMe"))["DTD"] == 50.0


def test_figures_from_records_at_several_schedules(tmp_path):
    for method, pts in {"tome": [("low", 70.0, 700.0), ("high", 60.0, 1300.0)],
                        "pyra": [("low", 72.0, 690.0), ("high", 65.0, 1280.0)], "peft": [("none", 74.0, 420.0)]}.items():
        for sched, acc, tp in pts:
            for task in tables.TASKS:
                _rec(tmp_path, task, acc, method, sched, throughput={"img_per_s": tp})
    _rec(tmp_path, "dtd", 70.0, "peft", "none", backbone="vit_s16_in21k", throughput={"img_per_s": 1300.0})
    out = tmp_path / "out"
    _tables(tmp_path, out, "tables=[3]", "figures=true")
    for ext in ("png", "pdf"):
        f = out / f"fig_{BB}.{ext}"
        assert f.exists() and f.stat().st_size > 1000
    assert not (out / "fig_vit_s16_in21k.png").exists()  # a reference point only (PEFT*), no figure of its own


def _figure_records(cost: str, seeds=(0, 1)):
    """ToMe and PYRA at low and high, PEFT on ViT-B/16 and ViT-S/16 (its smaller backbone): per point an
    accuracy (every task alike, seed s adds 2s - 1 around it when there are two seeds) and a cost (``cost``:
    "throughput" img/s or "flops" GMACs)."""
    points = {("tome", "low"): (70.0, 700.0, 8.8), ("tome", "high"): (60.0, 1300.0, 5.1),
              ("pyra", "low"): (72.0, 690.0, 8.8), ("pyra", "high"): (65.0, 1280.0, 5.1),
              ("peft", "none"): (74.0, 420.0, 17.6)}
    recs = []
    for (method, sched), (acc, tp, gmacs) in points.items():
        measured = {"throughput": {"img_per_s": tp}} if cost == "throughput" else {"flops": {"gmacs": gmacs}}
        for s in seeds:
            off = (2 * s - 1) if len(seeds) > 1 else 0
            recs += [_record(t, acc + off, method, sched, seed=s, **measured) for t in tables.TASKS]
    small = {"throughput": {"img_per_s": 1300.0}} if cost == "throughput" else {"flops": {"gmacs": 4.6}}
    recs += [_record(t, 66.0, "peft", "none", backbone="vit_s16_in21k", **small) for t in tables.TASKS]
    return recs


def _curves(ax):
    """{legend label: (xs, ys, error bar half-lengths or None, marker, linestyle)} of a figure's axes."""
    out = {}
    for c in ax.containers:
        line, _, bars = c.lines
        errs = [(seg[1][1] - seg[0][1]) / 2 for seg in bars[0].get_segments()] if c.has_yerr else None
        out[c.get_label()] = (list(line.get_xdata()), list(line.get_ydata()), errs, line.get_marker(),
                              line.get_linestyle())
    return out


def test_figure_shows_operating_points_references_and_the_spread_over_seeds():
    from pyra_bench.figures import figure_backbones, make_figure

    groups, _ = tables.group_records(_figure_records("throughput"))
    assert figure_backbones(list(groups.values())) == [BB]  # ViT-S/16 is only a reference point
    fig = make_figure(list(groups.values()), BB)
    (ax,) = fig.axes
    assert ax.get_title() == "ViT-B/16"
    assert "throughput" in ax.get_xlabel() and not ax.xaxis_inverted()
    curves = _curves(ax)
    assert set(curves) == {"ToMe", "PYRA", "PEFT (ViT-B/16)", "PEFT (ViT-S/16)"}
    # each curve over its operating points by throughput; the spread: the std of the per-seed Averages
    # (every task alike: seeds at acc - 1 and acc + 1 -> sqrt(2))
    assert curves["ToMe"][:3] == ([700.0, 1300.0], [pytest.approx(70.0), pytest.approx(60.0)],
                                  [pytest.approx(math.sqrt(2))] * 2)
    assert curves["PYRA"][:2] == ([690.0, 1280.0], [pytest.approx(72.0), pytest.approx(65.0)])
    assert curves["PEFT (ViT-B/16)"][:3] == ([420.0], [pytest.approx(74.0)], [pytest.approx(math.sqrt(2))])
    assert curves["PEFT (ViT-S/16)"][:2] == ([1300.0], [pytest.approx(66.0)])
    assert curves["PEFT (ViT-S/16)"][2] is None  # one seed: no error bar
    assert curves["ToMe"][3:] != curves["PYRA"][3:]  # distinct marker / line style per method
    # every point of a curve is labelled with its operating point, where it is drawn
    labels = sorted((t.get_text(), tuple(float(v) for v in t.xy)) for t in ax.texts)
    assert labels == sorted([("low", (700.0, 70.0)), ("high", (1300.0, 60.0)), ("low", (690.0, 72.0)),
                             ("high", (1280.0, 65.0))])


def test_figure_x_axis_is_macs_when_throughput_is_not_measured():
    from pyra_bench.figures import make_figure

    groups, _ = tables.group_records(_figure_records("flops", seeds=(0,)))
    (ax,) = make_figure(list(groups.values()), BB).axes
    assert "MACs" in ax.get_xlabel() and ax.xaxis_inverted()  # fewer MACs (faster) to the right
    curves = _curves(ax)
    assert curves["ToMe"][:3] == ([pytest.approx(5.1), pytest.approx(8.8)], [pytest.approx(60.0), pytest.approx(70.0)],
                                  None)  # one seed: no error bars
    assert curves["PEFT (ViT-S/16)"][0] == [pytest.approx(4.6)]


def test_pyra_is_also_compared_against_peft_by_default(tmp_path):
    """conf/tables.yaml: every row against ToMe, PYRA also against PEFT (taken uncompressed)."""
    from omegaconf import OmegaConf
    from scipy import stats as sps

    conf = OmegaConf.load(paths.CONF_DIR / "tables.yaml").paired
    assert conf.reference == "tome" and list(conf.also.pyra) == ["peft"]
    pyra = {t: 60.0 + i for i, t in enumerate(tables.TASKS)}
    peft = {t: v + (-5.0 if t == "dtd" else 1.0) for t, v in pyra.items()}  # PYRA 1 below, but 5 above on DTD
    for t in tables.TASKS:
        _rec(tmp_path, t, pyra[t], "pyra", "high")
        _rec(tmp_path, t, pyra[t] - 2.0, "tome", "high")
        _rec(tmp_path, t, peft[t], "peft", "none")
    out = tmp_path / "out"
    _tables(tmp_path, out, "tables=[3]", "formats=[csv]")  # the default paired settings
    paired = pd.read_csv(out / "paired.csv").set_index("Comparison")
    assert set(paired.index) == {"PYRA − ToMe", "PYRA − PEFT"}  # ToMe's and PEFT's rows have no references
    row = paired.loc["PYRA − PEFT"]
    d = {t: pyra[t] - peft[t] for t in tables.TASKS}
    # by hand: Natural (7 tasks, DTD among them) (6 x -1 + 5) / 7, Specialized and Structured -1
    assert row["Difference"] == pytest.approx(((-6 + 5) / 7 - 1 - 1) / 3)
    assert row["Better on"] == 1 and row["Worse on"] == 18 and row["Tasks"] == 19 and row["Over"] == "Average"
    assert row["Wilcoxon p"] == pytest.approx(sps.wilcoxon(list(d.values())).pvalue)
    assert row["CI over"].startswith("tasks within groups")  # one seed: resampled over tasks
    assert row["Sentence"].startswith("PYRA − PEFT (ViT-B/16, high): ")
    assert paired.loc["PYRA − ToMe", "Difference"] == pytest.approx(2.0)
    assert pd.read_csv(out / "paired_tasks.csv").set_index("Comparison").loc["PYRA − PEFT", "DTD"] == pytest.approx(5.0)


def test_groups_differing_only_in_the_method_key_are_two_rows_none_dropped():
    """Old records of a setting (``variant`` and method key "pyra-full") beside today's ("pyra", no options):
    one paper key, two groups. The paper's row shows today's; the other is a row of its own, named by its key,
    in the tables, the paired table and the figure."""
    from pyra_bench.figures import make_figure

    recs = []
    for t in tables.TASKS:
        recs += [_record(t, 70.0, "pyra", method_key="pyra", method_options={}, throughput={"img_per_s": 900.0}),
                 _record(t, 50.0, "pyra", variant="full", method_key="pyra-full", throughput={"img_per_s": 900.0}),
                 _record(t, 40.0, "tome", throughput={"img_per_s": 950.0})]
    t3, groups = _paper_table(recs, "3")
    assert len(groups) == 3
    rows = {r.label: r for r in t3.rows if not r.cells["average"].missing}
    assert set(rows) == {"PYRA", "PYRA (method key pyra-full)", "ToMe"}
    assert rows["PYRA"].cells["average"].mean == pytest.approx(70.0) and rows["PYRA"].in_paper
    other = rows["PYRA (method key pyra-full)"]
    assert other.cells["average"].mean == pytest.approx(50.0) and not other.in_paper and other.block == "ViT-B/16"
    summary, _ = tables.paired_comparisons(groups, "tome", {}, n_resamples=200)
    diffs = dict(zip(summary["Comparison"], summary["Difference"]))
    assert diffs == {"PYRA − ToMe": pytest.approx(30.0), "PYRA (method key pyra-full) − ToMe": pytest.approx(10.0)}
    curves = _curves(make_figure(list(groups.values()), BB).axes[0])
    assert {k: v[1] for k, v in curves.items()} == {"PYRA": [pytest.approx(70.0)], "ToMe": [pytest.approx(40.0)],
                                                    "PYRA (method key pyra-full)": [pytest.approx(50.0)]}


def test_runs_whose_schedule_missed_the_budget_are_marked(tmp_path):
    """DiffRate's budget_miss (its method state, as the run record carries it) marks the entries it enters,
    with a legend line, in Markdown, LaTeX and CSV; tables without such a run carry neither."""
    from pyra_bench.latex import table_to_latex
    from pyra_bench.models import build_model

    with pytest.warns(UserWarning, match="away from the budget"):  # the state of a real off-budget DiffRate
        far = build_model("vit_tiny_test", 10, "diffrate", "flops:0.9", method_kwargs={
            "granularity": 2, "kept_schedule": {"prune_kept": [17, 9, 5], "merge_kept": [17, 9, 5]}})
    missed = far.pyra_method.state()
    assert missed["budget_miss"] is True
    met = {**missed, "budget_miss": False}
    recs = []
    for t in tables.TASKS:
        for s in (0, 1):
            state = missed if (t, s) == ("dtd", 1) else met
            recs.append(_record(t, 60.0 + s, "diffrate", "high", seed=s, method_state=state))
            recs.append(_record(t, 62.0 + s, "tome", "high", seed=s))
    t3, _ = _paper_table(recs, "3")
    (dr,) = [r for r in t3.rows if r.label == "DiffRate" and r.backbone == "ViT-B/16"]
    flagged = {lab for key, lab, _ in t3.value_cols if dr.cells[key].off_budget}
    assert flagged == {"DTD", "Natural", "Average"}  # the task, its group and the Average
    md = tables.to_markdown(t3)
    line = next(ln for ln in md.splitlines() if "| DiffRate " in ln and ln.startswith("| ViT-B/16"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4 + tables.TASKS.index("dtd")] == "_60.5 ± 0.7_ ‡"  # second best (ToMe: 62.5), and marked
    assert cells[4 + tables.TASKS.index("caltech101")] == "_60.5 ± 0.7_"  # no run missed its budget there
    assert line.count("‡") == 3 and "- ‡: the searched schedule of at least one seed is further than" in md
    assert "‡" not in next(ln for ln in md.splitlines() if "| ToMe " in ln and ln.startswith("| ViT-B/16"))
    tex = table_to_latex(t3)
    (dr_tex,) = [c for b, rows in _tex_blocks(tex).items() if b == "ViT-B/16" for k, c in rows.items()
                 if k == "DiffRate"]
    assert dr_tex[3 + tables.TASKS.index("dtd")].endswith(r"$^\ddagger$") and tex.count(r"$^\ddagger$") == 4  # + legend
    frame = tables.table_frame(t3)
    assert _row(frame, "DiffRate")["Off budget"] == "DTD; Natural; Average" and _row(frame, "ToMe")["Off budget"] == ""
    clean, _ = _paper_table([r for r in recs if r["method"] == "tome"], "3")
    assert "‡" not in tables.to_markdown(clean) and r"\ddagger" not in table_to_latex(clean)


@pytest.mark.skipif(not PAPER_TXT.exists(), reason="the paper text lives outside the repository")
def test_transcribed_csv_matches_the_paper_text():
    import importlib.util

    spec = importlib.util.spec_from_file_location("transcribe", ROOT / "scripts/transcribe_paper.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fresh = pd.DataFrame(mod.parse(PAPER_TXT.read_text()))
    committed = _paper()
    assert len(fresh) == len(committed) == 653
    assert (fresh["value"].to_numpy() == committed["value"].to_numpy()).all()


@pytest.mark.parametrize("override,match", [
    ("tables=[2,9]", "unknown table '9'; valid choices: 2, 3"),
    ("formats=[md,xlsx]", "unknown format.* xlsx; valid choices: md, tex, csv"),
    ("metric=worst", "unknown metric 'worst'; valid choices: last, best"),
    ("paper=/nonexistent/paper.csv", "the paper's numbers are missing"),
    ("paired.resample=jackknife", "unknown paired.resample 'jackknife'; valid choices: seeds, tasks"),
    ("figure_methods=[]", r"figure_methods= is empty; give method names or method keys \(e.g. \[tome,pyra\]"),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, override, match):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=match):
        _tables(tmp_path, out, override)
    assert not out.exists()


def test_cli_writes_only_the_tables_and_bad_input_exits_2(tmp_path, monkeypatch, capsys):
    """The Hydra entry point (``python -m pyra_bench.tables ...``), in process: nothing but the tables is
    written (no outputs/, .hydra/ or log file); bad input is one message, exit status 2, nothing written."""
    runs, work = tmp_path / "runs", tmp_path / "work"
    work.mkdir()
    _rec(runs, "dtd", 50.0)
    monkeypatch.chdir(work)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    # (Hydra's logging set-up would close pytest's own log handlers: dictConfig shuts existing handlers down)
    args = ["pyra_bench.tables", f"records={runs}", "out=tables", "figures=false", "tables=[3]", "formats=[md]",
            "hydra/job_logging=none", "hydra/hydra_logging=none"]
    monkeypatch.setattr(sys, "argv", args)
    tables.main()
    assert sorted(p.name for p in work.iterdir()) == ["tables"]
    assert sorted(p.name for p in (work / "tables").iterdir()) == ["table3.md", "table3_vs_paper.md"]
    shutil.rmtree(work / "tables")
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", [*args, "tables=[9]"])
    with pytest.raises(SystemExit) as e:
        tables.main()
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m pyra_bench.tables: error: unknown table '9'; valid choices: 2, 3, 4, 5, 6, 7, 8"]
    assert list(work.iterdir()) == []


def test_throughput_from_several_devices_is_warned_about(tmp_path, capsys):
    for i, dev in enumerate(["NVIDIA H100", "NVIDIA A100", "NVIDIA H100"]):
        _rec(tmp_path, "cifar100", 70.0, "tome", "low", seed=i, throughput={"img_per_s": 1000.0 + i, "device": dev})
    _tables(tmp_path, tmp_path / "out", "tables=[2]")
    assert "measured on 2 devices (NVIDIA A100; NVIDIA H100)" in capsys.readouterr().err


def test_tuning_runs_are_summarised_apart_with_the_best_setting_per_task(tmp_path):
    vals = {("lr1e-3", "cifar100"): 60.0, ("lr3e-3", "cifar100"): 64.0,
            ("lr1e-3", "dtd"): 55.0, ("lr3e-3", "dtd"): 51.0}
    for (tag, task), acc in vals.items():
        _rec(tmp_path, task, None, "pyra", protocol="tuning", run_tag=tag,
             metrics={"test_top1": None, "val_top1": acc})
    recs = iter_records([tmp_path])
    assert not tables.group_records(recs)[0]  # never in the paper's tables
    t = tables.tuning_table(recs)
    rows = {r["run_tag"]: r for r in t.to_dict("records")}
    assert rows["lr1e-3"]["cifar100"] == 60.0 and rows["lr3e-3"]["dtd"] == 51.0
    assert rows["best"]["cifar100"] == "lr3e-3" and rows["best"]["dtd"] == "lr1e-3"
    _tables(tmp_path, tmp_path / "out", "tables=[2]")
    assert "lr3e-3" in (tmp_path / "out" / "tuning.md").read_text()


def _latex_records():
    """Table 3 at "high": ViT-B/16 (PEFT 80, ToMe 70, PYRA 71 and 72.25 on DTD, a new method 60) and ViT-L/16
    (ToMe 50, PYRA 55), one seed each; Table 6: two of PYRA's ablation variants."""
    recs = []
    for t in tables.TASKS:
        recs += [_record(t, 80.0, "peft", "none"), _record(t, 70.0, "tome", "high"),
                 _record(t, 72.25 if t == "dtd" else 71.0, "pyra", "high"),
                 _record(t, 60.0, "newmethod", "high", method_label="New_Method & co"),  # escaped
                 _record(t, 50.0, "tome", "high", backbone="vit_l16_in21k"),
                 _record(t, 55.0, "pyra", "high", backbone="vit_l16_in21k"),
                 _record(t, 69.0, "pyra", "high", method_key="pyra-wr", method_options={"variant": "wr"}),
                 _record(t, 68.0, "pyra", "high", method_key="pyra-direct", method_options={"variant": "direct"})]
    return recs


def _tex_blocks(tex: str) -> dict[str, dict[str, list[str]]]:
    """{block: {row label: cells}} of a table's LaTeX body, split at the block header rows."""
    out: dict[str, dict[str, list[str]]] = {}
    block = ""
    for ln in tex.splitlines():
        m = re.match(r"\\multicolumn\{\d+\}\{l\}\{\\textit\{(.*)\}\} \\\\$", ln)
        if m:
            block = m.group(1)
        elif ln.endswith(r" \\") and " & " in ln:
            cells = ln[:-3].split(" & ")
            out.setdefault(block, {})[cells[0]] = cells
    return out


def test_latex_marks_the_best_in_bold_and_the_second_underlined_within_each_block():
    """Runs without TeX: the marks, the alignment, the width and the math labels are in the LaTeX source."""
    from pyra_bench.latex import table_to_latex

    recs = _latex_records()
    t3, _ = _paper_table(recs, "3")
    tex = table_to_latex(t3)
    blocks = _tex_blocks(tex)
    dtd = 1 + 2 + tables.TASKS.index("dtd")  # Method, "# params", "Throughput", then the 19 tasks
    vit_b, vit_l = blocks["ViT-B/16"], blocks["ViT-L/16"]
    # ViT-B/16, DTD: PYRA 72.25 best, ToMe 70.0 second; the new method (60) unmarked
    assert vit_b["PYRA"][dtd] == r"\textbf{72.2}" and vit_b["ToMe"][dtd] == r"\underline{70.0}"
    assert vit_b[r"New\_Method \& co$^\dagger$"][dtd] == "60.0"
    assert vit_b["PYRA"][-1] == r"\textbf{71.06}"  # the Average: mean of (6 x 71 + 72.25) / 7, 71 and 71
    assert vit_b["ToMe"][-1] == r"\underline{70.00}"
    # ViT-L/16 is ranked on its own: 55 is its best and 50 its second, though both are below ViT-B/16's; its
    # reference row PEFT* (ViT-B/16, 80) is uncompressed and takes no part in the ranking (as in the paper)
    assert vit_l["PYRA"][dtd] == r"\textbf{55.0}" and vit_l["ToMe"][dtd] == r"\underline{50.0}"
    assert vit_l["PEFT* (ViT-B/16)"][dtd] == "80.0"
    # booktabs; numbers right-aligned (the Method column left); table* and shrunk to the line width
    spec = re.search(r"\\begin\{tabular\}\{([lr]+)\}", tex).group(1)
    assert spec == "l" + "r" * (2 + 19 + 4)
    assert all(r in tex for r in (r"\toprule", r"\midrule", r"\bottomrule"))
    assert tex.index(r"\begin{table*}") < tex.index(r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%") \
        < tex.index(r"\begin{tabular}") < tex.index(r"\end{tabular}}") < tex.index(r"\end{table*}")
    # the Markdown marks the same entries
    md = tables.to_markdown(t3)
    pyra_b = next(ln for ln in md.splitlines() if ln.startswith("| ViT-B/16") and "| PYRA " in ln)
    assert "**72.2**" in pyra_b and "**71.06**" in pyra_b
    tome_l = next(ln for ln in md.splitlines() if ln.startswith("| ViT-L/16") and "| ToMe " in ln)
    assert "_50.0_" in tome_l and "_50.00_" in tome_l
    # Tables 6 and 7: the ablation labels in math; a narrow table is a plain float, still fitted
    tex6, tex7 = (table_to_latex(_paper_table(recs, t)[0]) for t in ("6", "7"))
    for label in (r"Plain $W_r$", r"$\sigma(\cdot)$ \& $W_r$", r"Plain $W_D$", r"$\sigma(\cdot)$ \& $W_D$",
                  r"Plain $W_r$ \& $W_D$"):
        assert label in _tex_blocks(tex6)[""], label
    assert r"$W_{D \times r}^l$" in _tex_blocks(tex7)[""]
    assert r"\begin{table}[t]" in tex6 and r"\begin{table*}" not in tex6 and r"\resizebox" in tex6
    # Table 6 is one block: PYRA (71.06) best, the baseline ToMe (70) second, plain W_r (69) unmarked
    t6 = _tex_blocks(tex6)[""]
    assert t6["PYRA"][-1] == r"\textbf{71.06}" and t6["Baseline (ToMe)"][-1] == r"\underline{70.00}"
    assert t6[r"Plain $W_r$"][-1] == "69.00"


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no TeX engine installed")
def test_latex_compiles_and_marks_the_best_entry_in_bold(tmp_path):
    for r in _latex_records():
        write_record(tmp_path, r)
    out = tmp_path / "out"
    _tables(tmp_path, out, "tables=[3,6]", "formats=[tex]")
    tex = (out / "table3.tex").read_text()
    assert r"\textbf{72.2}" in next(ln for ln in tex.splitlines() if ln.startswith("PYRA &"))
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "tables.tex"], cwd=out,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    assert (out / "tables.pdf").stat().st_size > 1000
    assert re.search(r"Output written on tables.pdf \((\d+) pages?", run.stdout)



@pytest.mark.parametrize("methods, expected", [
    (None, {"ToMe", "PYRA", "DiffRate", "PYRA (variant=wd_sigmoid)"}),
    (["tome", "pyra"], {"ToMe", "PYRA"}),
    (["pyra", "pyra-wd_sigmoid"], {"PYRA", "PYRA (variant=wd_sigmoid)"}),
])
def test_figure_draws_the_chosen_methods_and_always_the_references(methods, expected):
    """``figure_methods``: method names (their default options) or method keys (one variant); PEFT and
    PEFT* are drawn whatever is chosen."""
    from pyra_bench.figures import make_figure

    recs = _figure_records("throughput", seeds=(0,))
    recs += [_record(t, 50.0, "diffrate", "low", throughput={"img_per_s": 710.0}) for t in tables.TASKS]
    recs += [_record(t, 71.0, "pyra", "low", method_key="pyra-wd_sigmoid", method_options={"variant": "wd_sigmoid"},
                     throughput={"img_per_s": 695.0}) for t in tables.TASKS]
    groups, _ = tables.group_records(recs)
    (ax,) = make_figure(list(groups.values()), BB, methods=methods).axes
    assert set(_curves(ax)) == expected | {"PEFT (ViT-B/16)", "PEFT (ViT-S/16)"}


def test_the_command_draws_the_papers_curves_by_default_and_can_put_the_paper_beside(tmp_path):
    """The command's defaults: the figure shows ToMe and PYRA (the paper's curves), not DiffRate;
    ``paper_beside=true`` puts the published row and ours minus paper below each paper row of a table."""
    p = _paper()
    pub = p[(p.table == "3") & (p.method == "tome") & (p.schedule == "high") & (p.backbone == BB)]
    pub = dict(zip(pub.column, pub.value))
    for t in tables.TASKS:  # ToMe high at the published numbers, DTD one point above
        _rec(tmp_path, t, pub[t] + (1.0 if t == "dtd" else 0.0), "tome", "high", throughput={"img_per_s": 1400.0})
    for method in ("pyra", "diffrate"):
        for t in tables.TASKS:
            _rec(tmp_path, t, 60.0, method, "high", throughput={"img_per_s": 1300.0})
    out = tmp_path / "out"
    with initialize_config_dir(config_dir=str(paths.CONF_DIR), version_base="1.3"):
        cfg = compose("tables", overrides=[f"records={tmp_path}", f"out={out}", "tables=[3]", "formats=[csv,md]",
                                           "paper_beside=true", "paired.n_resamples=100"])
    tables.run(cfg)
    df = pd.read_csv(out / "table3.csv")
    rows = df[(df.Backbone == "ViT-B/16") & df.Method.str.startswith("ToMe")]
    assert list(rows.Method) == ["ToMe", "ToMe — paper", "ToMe — Δ"]
    assert list(rows.DTD) == [pytest.approx(pub["dtd"] + 1.0), pytest.approx(pub["dtd"]), pytest.approx(1.0)]
    assert list(rows["Cifar100"]) == [pytest.approx(pub["cifar100"]), pytest.approx(pub["cifar100"]), 0.0]
    assert "ToMe — Δ" in (out / "table3.md").read_text()
    o = tables.check_options(cfg)
    assert o.figure_methods == ["tome", "pyra"]
    from pyra_bench.figures import make_figure

    groups, _ = tables.group_records(iter_records([tmp_path]))
    (ax,) = make_figure(list(groups.values()), BB, methods=o.figure_methods).axes
    assert set(_curves(ax)) == {"ToMe", "PYRA"}
    assert (out / f"fig_{BB}.png").is_file()
