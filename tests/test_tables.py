"""The aggregator, fed the paper's own per-task numbers, must reproduce the paper's printed Averages."""

import math
import re
from pathlib import Path

import pandas as pd
import pytest

from pyra_bench import tables
from pyra_bench.records import iter_records, write_record

PAPER_TXT = Path(__file__).resolve().parents[2] / "shared" / "paper" / "pyra_eccv2024.txt"


def _paper():
    return tables.load_paper()


def _write_paper_as_records(tmp_path, table, metric_field="test_top1", drop=()):
    p = _paper()
    pt = p[(p.table == table) & p.column.isin(tables.TASKS)]
    n = 0
    for (bb, method, variant, schedule), g in pt.groupby(tables.KEY):
        for _, r in g.iterrows():
            if (bb, method, r.column) in drop:
                continue
            write_record(tmp_path, {"run_id": f"{r.column}__{bb}__{method}-{variant}__{schedule}", "status": "completed",
                                    "task": r.column, "backbone": bb, "method": method, "variant": variant or None,
                                    "schedule": schedule, "seed": 0, "metrics": {metric_field: r.value},
                                    "params": {"paper_pct": 0.34}})
            n += 1
    return n


@pytest.mark.parametrize("table", ["2", "3"])
def test_paper_numbers_reproduce_the_printed_average(tmp_path, table):
    assert _write_paper_as_records(tmp_path, table) == 12 * 19
    out = tmp_path / "out"
    assert tables.main(["--records", str(tmp_path), "--out", str(out), "--tables", table, "--no-figures"]) == 0
    cmp = pd.read_csv(out / f"table{table}_vs_paper.csv")
    avg = cmp[cmp.Column == "Average"]
    assert len(avg) == 12 and avg.measured.notna().all()
    # mean of the three group means, as the paper computes it (a flat 19-task mean misses by ~2 points)
    assert (avg["diff"].abs() <= 0.02).all(), avg[avg["diff"].abs() > 0.02]
    assert (cmp[cmp.Column.isin(tables.TASK_LABELS)]["diff"].abs() < 1e-9).all()
    md = (out / f"table{table}.md").read_text()
    assert "PYRA" in md and "PEFT*" in md if table == "3" else "PYRA" in md
    assert (out / f"table{table}.tex").read_text().count("\\begin{tabular}") == 1


def test_flat_mean_would_not_reproduce_the_paper():
    """Guards the test above: the Average really is the mean of group means."""
    p = _paper()
    row = p[(p.table == "2") & (p.backbone == "vit_b16_in21k") & (p.method == "peft")]
    vals = dict(zip(row.column, row.value))
    flat = sum(vals[t] for t in tables.TASKS) / 19
    assert abs(flat - vals["average"]) > 1.0
    assert abs(tables.vtab_average(vals)["average"] - vals["average"]) <= 0.01


def test_missing_task_shows_as_missing_not_zero(tmp_path):
    _write_paper_as_records(tmp_path, "2", drop={("vit_b16_in21k", "pyra", "dtd")})
    out = tmp_path / "out"
    tables.main(["--records", str(tmp_path), "--out", str(out), "--tables", "2", "--no-figures"])
    t = pd.read_csv(out / "table2.csv")
    row = t[(t.Method == "PYRA") & (t.Backbone == "ViT-B/16")].iloc[0]
    assert math.isnan(row["DTD"]) and math.isnan(row["Natural"]) and math.isnan(row["Average"])
    assert not math.isnan(row["Specialized"]) and row["Tasks"] == "18/19"
    assert "—" in (out / "table2.md").read_text()


def test_metric_best_and_seed_averaging(tmp_path):
    for seed, (last, best) in enumerate([(50.0, 60.0), (70.0, 80.0)]):
        for task in tables.TASKS:
            write_record(tmp_path, {"run_id": f"{task}-{seed}", "status": "completed", "task": task,
                                    "backbone": "vit_b16_in21k", "method": "tome", "variant": None, "schedule": "high",
                                    "seed": seed, "metrics": {"test_top1": last, "test_top1_best": best}})
    df = tables.records_frame(tables.iter_records([tmp_path]), "last")
    assert tables.summarise(df).iloc[0]["average"] == pytest.approx(60.0)
    df = tables.records_frame(tables.iter_records([tmp_path]), "best")
    assert tables.summarise(df).iloc[0]["average"] == pytest.approx(70.0)


def test_figures_from_records_at_several_schedules(tmp_path):
    for method, pts in {"tome": [("low", 70.0, 700.0), ("high", 60.0, 1300.0)],
                        "pyra": [("low", 72.0, 690.0), ("high", 65.0, 1280.0)], "peft": [("none", 74.0, 420.0)]}.items():
        for sched, acc, tp in pts:
            for task in tables.TASKS:
                write_record(tmp_path, {"run_id": f"{task}-{method}-{sched}", "status": "completed", "task": task,
                                        "backbone": "vit_b16_in21k", "method": method,
                                        "variant": "full" if method == "pyra" else None, "schedule": sched, "seed": 0,
                                        "metrics": {"test_top1": acc}, "throughput": {"img_per_s": tp}})
    out = tmp_path / "out"
    tables.main(["--records", str(tmp_path), "--out", str(out), "--tables", "3"])
    for ext in ("png", "pdf"):
        f = out / f"fig_vit_b16_in21k.{ext}"
        assert f.exists() and f.stat().st_size > 1000


@pytest.mark.skipif(not PAPER_TXT.exists(), reason="the paper text lives outside the repository")
def test_transcribed_csv_matches_the_paper_text():
    import importlib.util

    spec = importlib.util.spec_from_file_location("transcribe", Path(__file__).parents[1] / "scripts/transcribe_paper.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fresh = pd.DataFrame(mod.parse(PAPER_TXT.read_text()))
    committed = _paper()
    assert len(fresh) == len(committed) == 653
    assert (fresh["value"].to_numpy() == committed["value"].to_numpy()).all()


@pytest.mark.parametrize("args,match", [
    (["--tables", "2,9"], "unknown table '9'; valid choices: 2, 3"),
    (["--format", "md,xlsx"], "unknown format.* xlsx; valid choices: md, tex, csv"),
    (["--paper", "/nonexistent/paper.csv"], "the paper's numbers are missing"),
])
def test_bad_arguments_fail_before_anything_is_written(tmp_path, capsys, args, match):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        tables.main(["--records", str(tmp_path), "--out", str(out), "--no-figures", *args])
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists()


def test_throughput_from_several_devices_is_warned_about(tmp_path, capsys):
    for i, dev in enumerate(["NVIDIA H100", "NVIDIA A100", "NVIDIA H100"]):
        write_record(tmp_path, {"run_id": f"r{i}", "task": "cifar100", "backbone": "vit_b16_in21k", "method": "tome",
                                "schedule": "low", "seed": i, "status": "completed", "metrics": {"test_top1": 70.0},
                                "throughput": {"img_per_s": 1000.0 + i, "device": dev}})
    tables.main(["--records", str(tmp_path), "--out", str(tmp_path / "out"), "--tables", "2", "--no-figures"])
    err = capsys.readouterr().err
    assert "measured on 2 devices (NVIDIA A100; NVIDIA H100)" in err


def test_tuning_runs_are_summarised_apart_with_the_best_setting_per_task(tmp_path):
    vals = {("lr1e-3", "cifar100"): 60.0, ("lr3e-3", "cifar100"): 64.0,
            ("lr1e-3", "dtd"): 55.0, ("lr3e-3", "dtd"): 51.0}
    for i, ((tag, task), acc) in enumerate(vals.items()):
        write_record(tmp_path, {"run_id": f"t{i}", "task": task, "backbone": "vit_b16_in21k", "method": "pyra",
                                "schedule": "high", "seed": 0, "status": "completed", "protocol": "tuning",
                                "config": {"run_tag": tag},
                                "metrics": {"test_top1": None, "val_top1": acc}})
    recs = iter_records([tmp_path])
    assert tables.records_frame(recs).empty  # never in the paper's tables
    t = tables.tuning_table(recs)
    rows = {r["run_tag"]: r for r in t.to_dict("records")}
    assert rows["lr1e-3"]["cifar100"] == 60.0 and rows["lr3e-3"]["dtd"] == 51.0
    assert rows["best"]["cifar100"] == "lr3e-3" and rows["best"]["dtd"] == "lr1e-3"
    tables.main(["--records", str(tmp_path), "--out", str(tmp_path / "out"), "--tables", "2", "--no-figures"])
    assert "lr3e-3" in (tmp_path / "out" / "tuning.md").read_text()
