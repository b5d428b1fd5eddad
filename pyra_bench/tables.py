"""``python -m pyra_bench.tables``: rebuild the paper's Tables 2-8 and Figures 2/4 from run records.

The layout of every table (which rows, in which blocks, which columns) is read from the paper's own
numbers, transcribed once into ``results/paper/paper_tables.csv`` (``scripts/transcribe_paper.py``), so
each rebuilt table has the paper's rows and sits beside the published values:

* Tables 2-3: per-task columns, the three group means and "Average"; Tables 4-5: "Average";
  Tables 6-8: Natural / Specialized / Structured / Average.
* "Average" is computed as the paper computes it: the mean of the three group means (Natural 7 tasks,
  Specialized 4, Structured 8), not the mean of the 19 tasks. A group (and so the Average) is missing
  unless every task in it has a record: missing runs show as missing, never as zeros.
* Accuracy is the records' ``test_top1`` (last epoch, the VTAB protocol) unless ``--metric best``
  (the best evaluated epoch, the paper's convention; labelled in every output).
* Several records for one cell (seeds) are averaged; "# params" and "Throughput" are means over tasks.

Tuning runs (``protocol=tuning``: train800 -> val200) never enter these tables; ``tuning.md|.csv`` lists
their val200 top-1 per setting (``run_tag``) and task, and the best setting per task, for choosing the
hyperparameters of the final runs.

Outputs, per table: ``table<N>.md|.tex|.csv`` and ``table<N>_vs_paper.md|.csv`` (measured, paper,
difference); figures ``fig_<backbone>.png|.pdf`` (accuracy versus throughput, one curve per method).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from .records import iter_records

TASKS = ["cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_pet", "svhn", "sun397",
         "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
         "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele"]
GROUPS = {"natural": TASKS[:7], "specialized": TASKS[7:11], "structured": TASKS[11:]}
TASK_LABELS = ["Cifar100", "Caltech101", "DTD", "Flowers102", "Pets", "SVHN", "Sun397", "Camelyon", "EuroSAT",
               "Resisc45", "Retinopathy", "Clevr-Count", "Clevr-Dist", "DMLab", "KITTI-Dist", "dSpr-Loc", "dSpr-Ori",
               "sNORB-Azim", "sNORB-Ele"]
METHOD_LABELS = {"peft": "PEFT", "rap": "RaP", "spvit": "SPViT", "diffrate": "DiffRate", "tome": "ToMe",
                 "pyra": "PYRA"}
VARIANT_LABELS = {"wr": "Plain W_r", "wr_sigmoid": "sigmoid & W_r", "wd": "Plain W_D", "wd_sigmoid": "sigmoid & W_D",
                  "wrwd_plain": "Plain W_r & W_D", "direct": "W_{D x r}", "gated": "Gated"}
BACKBONE_LABELS = {"vit_b16_in21k": "ViT-B/16", "vit_l16_in21k": "ViT-L/16", "vit_s16_in21k": "ViT-S/16",
                   "vit_l16_mae": "ViT-L (MAE)", "vit_b16_mae": "ViT-B (MAE)", "deit_b16_distilled": "DeiT-B",
                   "deit_s16_distilled": "DeiT-S"}
TABLE_KIND = {"2": "tasks", "3": "tasks", "4": "average", "5": "average", "6": "groups", "7": "groups", "8": "groups"}
PAPER_CSV = Path(__file__).resolve().parent.parent / "results" / "paper" / "paper_tables.csv"
KEY = ["backbone", "method", "variant", "schedule"]


def _variant(method: str, variant) -> str:
    if method == "pyra":
        return variant if isinstance(variant, str) and variant else "full"
    return ""


def records_frame(records: Iterable[dict], metric: str = "last") -> pd.DataFrame:
    """One row per record: key, task, accuracy, # params %, throughput, GMACs."""
    field = {"last": "test_top1", "best": "test_top1_best"}[metric]
    rows = []
    for r in records:
        acc = (r.get("metrics") or {}).get(field)
        if acc is None:
            continue
        rows.append({"backbone": r.get("backbone"), "method": r.get("method"),
                     "variant": _variant(r.get("method"), r.get("variant")), "schedule": str(r.get("schedule")),
                     "task": r.get("task"), "acc": float(acc),
                     "params_pct": (r.get("params") or {}).get("paper_pct"),
                     "throughput": (r.get("throughput") or {}).get("img_per_s"),
                     "gmacs": (r.get("flops") or {}).get("gmacs"), "seed": r.get("seed")})
    return pd.DataFrame(rows, columns=[*KEY, "task", "acc", "params_pct", "throughput", "gmacs", "seed"])


def vtab_average(per_task: dict[str, float]) -> dict[str, float]:
    """Group means (NaN if a task of the group is missing) and their mean, the paper's Average."""
    out = {}
    for g, tasks in GROUPS.items():
        vals = [per_task.get(t) for t in tasks]
        out[g] = float(sum(vals) / len(vals)) if all(v is not None and not math.isnan(v) for v in vals) else math.nan
    gm = [out[g] for g in GROUPS]
    out["average"] = float(sum(gm) / 3) if not any(math.isnan(v) for v in gm) else math.nan
    return out


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (backbone, method, variant, schedule): per-task means, groups, Average, params, speed."""
    rows = []
    for key, g in df.groupby(KEY, dropna=False):
        per_task = g.groupby("task")["acc"].mean().to_dict()
        row = dict(zip(KEY, key))
        row.update(per_task)
        row.update(vtab_average(per_task))
        row["n_tasks"] = sum(t in per_task for t in TASKS)
        row["n_runs"] = len(g)
        row["params_pct"] = g["params_pct"].mean()
        row["throughput"] = g["throughput"].mean() if g["throughput"].notna().any() else math.nan
        row["gmacs"] = g["gmacs"].mean() if g["gmacs"].notna().any() else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def load_paper(path: Path = PAPER_CSV) -> pd.DataFrame:
    p = pd.read_csv(path, dtype={"table": str}, keep_default_na=False)
    p["value"] = p["value"].astype(float)
    return p


def _row_label(method: str, variant: str, backbone: str, table: str, main_backbone: str) -> str:
    if table in ("6", "7", "8"):
        return "Baseline (ToMe)" if method == "tome" else VARIANT_LABELS.get(variant, "PYRA")
    label = METHOD_LABELS.get(method, method)
    if backbone != main_backbone:
        label += f"* ({BACKBONE_LABELS.get(backbone, backbone)})"
    return label


def build_table(table: str, summary: pd.DataFrame, paper: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """-> (the table as the paper lays it out, the measured-vs-paper comparison)."""
    pt = paper[paper["table"] == table]
    kind = TABLE_KIND[table]
    value_cols = {"tasks": TASKS + list(GROUPS) + ["average"], "groups": list(GROUPS) + ["average"],
                  "average": ["average"]}[kind]
    order = pt.drop_duplicates(KEY)[KEY].values.tolist()
    idx = {tuple(str(v) for v in k): r for k, r in
           summary.set_index(KEY).iterrows()} if len(summary) else {}
    out, cmp = [], []
    for i, (bb, method, variant, schedule) in enumerate(order):
        # A PEFT row heads its block; its "main" backbone is the compressed methods' one below it.
        nxt = [o for o in order[i + 1:] if o[1] != "peft"]
        main = nxt[0][0] if (method == "peft" and nxt) else bb
        m = idx.get((bb, method, variant, schedule))
        paper_row = pt[(pt.backbone == bb) & (pt.method == method) & (pt.variant == variant) & (pt.schedule == schedule)]
        pv = dict(zip(paper_row.column, paper_row.value))
        row = {"Block": BACKBONE_LABELS.get(main, main) if table in ("2", "3") else schedule,
               "Method": _row_label(method, variant, bb, table, main),
               "Backbone": BACKBONE_LABELS.get(bb, bb), "Schedule": schedule,
               "# params": f"{m['params_pct']:.2f}%" if m is not None and not math.isnan(m["params_pct"] or math.nan) else "—",
               "Throughput": round(m["throughput"]) if m is not None and not math.isnan(m["throughput"]) else "—"}
        for c in value_cols:
            v = m[c] if (m is not None and c in m.index) else math.nan
            row[_col_label(c)] = v
            if c in pv or c == "average":
                cmp.append({"Method": row["Method"], "Backbone": row["Backbone"], "Schedule": schedule,
                            "Column": _col_label(c), "measured": v, "paper": pv.get(c, math.nan),
                            "diff": v - pv.get(c, math.nan)})
        row["Tasks"] = f"{int(m['n_tasks'])}/19" if m is not None else "0/19"
        out.append(row)
    return pd.DataFrame(out), pd.DataFrame(cmp)


def _col_label(c: str) -> str:
    if c in TASKS:
        return TASK_LABELS[TASKS.index(c)]
    return c.capitalize()


def _fmt(df: pd.DataFrame) -> pd.DataFrame:
    return df.apply(lambda col: col.map(lambda v: "—" if isinstance(v, float) and math.isnan(v)
                                        else (f"{v:.2f}" if isinstance(v, float) else v)))


def tuning_table(records: Iterable[dict]) -> pd.DataFrame:
    """val200 top-1 of the tuning runs: one row per (backbone, method, variant, schedule, run_tag), one
    column per task (seeds averaged), and a ``best`` row per (backbone, method, variant, schedule) naming
    the best tag of each task."""
    rows = []
    for r in records:
        acc = (r.get("metrics") or {}).get("val_top1")
        if r.get("protocol") != "tuning" or acc is None:
            continue
        rows.append({"backbone": r.get("backbone"), "method": r.get("method"),
                     "variant": _variant(r.get("method"), r.get("variant")), "schedule": str(r.get("schedule")),
                     "run_tag": str((r.get("config") or {}).get("run_tag") or "-"), "task": r.get("task"),
                     "acc": float(acc)})
    if not rows:
        return pd.DataFrame(columns=[*KEY, "run_tag"])
    df = pd.DataFrame(rows)
    wide = df.pivot_table(index=[*KEY, "run_tag"], columns="task", values="acc", aggfunc="mean")
    wide = wide[[t for t in TASKS + sorted(set(wide.columns) - set(TASKS)) if t in wide.columns]]
    out = []
    for key, g in wide.groupby(level=list(range(len(KEY))), sort=True):
        block = g.reset_index()
        out.append(block)
        best = {c: block.loc[block[c].idxmax(), "run_tag"] if block[c].notna().any() else None
                for c in g.columns}
        out.append(pd.DataFrame([{**dict(zip(KEY, key)), "run_tag": "best", **best}]))
    return pd.concat(out, ignore_index=True)


def write_table(df: pd.DataFrame, out: Path, name: str, formats: set[str], title: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if "csv" in formats:
        df.to_csv(out / f"{name}.csv", index=False)
        paths.append(out / f"{name}.csv")
    if "md" in formats:
        (out / f"{name}.md").write_text(f"## {title}\n\n" + _fmt(df).to_markdown(index=False) + "\n")
        paths.append(out / f"{name}.md")
    if "tex" in formats:
        tex = _fmt(df).to_latex(index=False, escape=True, caption=title, column_format="l" * len(df.columns))
        tex = tex.replace("\\toprule", "\\toprule").replace("\\hline", "")
        (out / f"{name}.tex").write_text(tex)
        paths.append(out / f"{name}.tex")
    return paths


def draw_figures(summary: pd.DataFrame, out: Path) -> list[Path]:
    """Accuracy vs throughput (or vs GMACs when no throughput was measured), one curve per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if summary.empty:
        return paths
    for bb, g in summary.groupby("backbone"):
        y = g["average"].where(g["average"].notna(), g[[t for t in TASKS + ["digits"] if t in g.columns]].mean(axis=1))
        g = g.assign(_y=y)
        curves = g[g["method"] != "peft"].groupby(["method", "variant"])
        if not any(len(c) >= 2 for _, c in curves):
            print(f"[tables] figure for {bb}: skipped (no method has records at two or more compression rates)")
            continue
        use_tp = g["throughput"].notna().all()
        xcol, xlabel = ("throughput", "throughput (img/s)") if use_tp else ("gmacs", "GMACs per image (lower is faster)")
        complete = g["average"].notna().all()
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for (method, variant), c in curves:
            c = c.sort_values(xcol)
            label = METHOD_LABELS.get(method, method) + (f" ({variant})" if variant not in ("", "full") else "")
            ax.plot(c[xcol], c["_y"], marker="o", label=label)
        for _, r in g[g["method"] == "peft"].iterrows():
            ax.scatter([r[xcol]], [r["_y"]], marker="*", s=120, color="k", label="PEFT (uncompressed)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("VTAB-1k average top-1 (%)" if complete else "mean top-1 over available tasks (%)")
        ax.set_title(BACKBONE_LABELS.get(bb, bb))
        if not use_tp:
            ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        for ext in ("png", "pdf"):
            p = out / f"fig_{bb}.{ext}"
            fig.savefig(p, dpi=150)
            paths.append(p)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyra_bench.tables", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", nargs="+", default=["results/runs"], help="run-record files or folders")
    ap.add_argument("--out", default="results/tables", help="output folder")
    ap.add_argument("--tables", default="2,3,4,5,6,7,8", help="comma-separated table numbers")
    ap.add_argument("--metric", choices=["last", "best"], default="last",
                    help="last epoch (VTAB protocol, default) or best evaluated epoch (the paper's convention)")
    ap.add_argument("--format", default="md,tex,csv", help="comma-separated: md, tex, csv")
    ap.add_argument("--paper", default=str(PAPER_CSV), help="the paper's numbers (CSV)")
    ap.add_argument("--no-figures", action="store_true")
    a = ap.parse_args(argv)
    tables = [s.strip() for s in a.tables.split(",") if s.strip()]
    for t in tables:
        if t not in TABLE_KIND:
            ap.error(f"unknown table {t!r}; valid choices: {', '.join(TABLE_KIND)}")
    formats = {f.strip() for f in a.format.split(",") if f.strip()}
    if not formats or formats - {"md", "tex", "csv"}:
        ap.error(f"unknown format(s) {', '.join(sorted(formats - {'md', 'tex', 'csv'})) or '(none)'}; valid choices: md, tex, csv")
    if not Path(a.paper).is_file():
        ap.error(f"the paper's numbers are missing: {a.paper} (rebuild with scripts/transcribe_paper.py)")
    for r in a.records:
        if not Path(r).exists():
            print(f"[tables] warning: {r} does not exist; no records read from it", file=sys.stderr)
    recs = iter_records(a.records)
    df = records_frame(recs, a.metric)
    summary = summarise(df)
    paper = load_paper(Path(a.paper))
    out = Path(a.out)
    label = "last-epoch top-1 (VTAB protocol)" if a.metric == "last" else "BEST evaluated epoch top-1 (paper's convention)"
    print(f"[tables] {len(recs)} records, {len(df)} with accuracy; metric: {label}")
    devices = sorted({(r.get("throughput") or {}).get("device") for r in recs} - {None})
    if len(devices) > 1:
        print(f"[tables] warning: throughput was measured on {len(devices)} devices ({'; '.join(devices)}); the "
              f"columns mix them. Measure every run on one device: python -m pyra_bench.bench "
              f"bench.run='outputs/runs/*' bench.device=cuda", file=sys.stderr)
    for t in tables:
        table, cmp = build_table(t, summary, paper)
        filled = int(table["Average"].notna().sum()) if "Average" in table else 0
        title = f"Table {t} ({label})"
        write_table(table, out, f"table{t}", formats, title)
        write_table(cmp, out, f"table{t}_vs_paper", formats & {"md", "csv"}, f"Table {t}: measured vs paper ({label})")
        print(f"[tables] table {t}: {len(table)} rows, {filled} with a complete Average -> {out}/table{t}.*")
    tuning = tuning_table(recs)
    if len(tuning):
        write_table(tuning, out, "tuning", formats & {"md", "csv"}, "Tuning runs: val200 top-1 (train800 -> val200)")
        print(f"[tables] tuning: {int((tuning['run_tag'] != 'best').sum())} settings -> {out}/tuning.*")
    if not a.no_figures:
        for p in draw_figures(summary, out):
            print(f"[tables] figure -> {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
