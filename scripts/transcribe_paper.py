#!/usr/bin/env python
"""Transcribe the paper's Tables 2-8 from its text into results/paper/paper_tables.csv (run once).

The CSV is the committed source of truth for the published numbers; tests/test_tables.py re-parses the
paper text (when ../shared/paper is present) and checks the CSV against it.

    python scripts/transcribe_paper.py [--paper ../shared/paper/pyra_eccv2024.txt] [--out results/paper/paper_tables.csv]
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

TASKS = ["cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_pet", "svhn", "sun397",
         "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
         "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele"]
METHOD = {"PEFT": "peft", "PEFT*": "peft", "RaP": "rap", "SPViT": "spvit", "DiffRate": "diffrate", "ToMe": "tome",
          "PYRA": "pyra"}
ABLATION = {"Baseline": ("tome", None), "Plain W_r": ("pyra", "wr"), "$\\sigma(\\cdot)$ & W_r": ("pyra", "wr_sigmoid"),
            "Plain W_D": ("pyra", "wd"), "$\\sigma(\\cdot)$ & W_D": ("pyra", "wd_sigmoid"),
            "Plain W_r & W_D": ("pyra", "wrwd_plain"), "PYRA": ("pyra", "full"),
            "$W_{D \\times r}^l$": ("pyra", "direct"), "Gated": ("pyra", "gated")}
FIELDS = ["table", "backbone", "schedule", "method", "variant", "column", "value"]


def _num(s: str) -> float:
    return float(re.sub(r"</?u>|\*\*|%", "", s).strip())


def _method(label: str) -> str:
    return METHOD[re.sub(r"\s*\[\d+\]", "", label).strip()]


def parse(text: str) -> list[dict]:
    lines = text.splitlines()
    rows: list[dict] = []

    def add(table, backbone, schedule, method, variant, column, value):
        rows.append(dict(table=table, backbone=backbone, schedule=schedule, method=method, variant=variant or "",
                         column=column, value=value))

    def section(title_prefix: str) -> list[str]:
        start = next(i for i, ln in enumerate(lines) if ln.startswith(title_prefix))
        out = []
        for ln in lines[start + 1:]:
            if ln.startswith("Table ") or (out and not ln.strip() and len(out) > 3 and not out[-1].strip()):
                break
            out.append(ln)
        return out

    # Tables 2 and 3: per task
    for table, schedule in (("2", "low"), ("3", "high")):
        backbone = None
        for ln in section(f"Table {table}:"):
            if ln.startswith("Model: ViT-B/16"):
                backbone, small = "vit_b16_in21k", "vit_s16_in21k"
                continue
            if ln.startswith("Model: ViT-L/16"):
                backbone, small = "vit_l16_in21k", "vit_b16_in21k"
                continue
            cells = [c for c in ln.split("\t") if c.strip()]
            if backbone is None or len(cells) != 23:
                continue
            label = cells[0].strip()
            method = _method(label)
            bb = small if label.endswith("*") else backbone
            sched = "none" if method == "peft" else schedule
            add(table, bb, sched, method, "full" if method == "pyra" else "", "params_pct", _num(cells[1]))
            add(table, bb, sched, method, "full" if method == "pyra" else "", "throughput", _num(cells[2]))
            for task, v in zip(TASKS, cells[3:22]):
                add(table, bb, sched, method, "full" if method == "pyra" else "", task, _num(v))
            add(table, bb, sched, method, "full" if method == "pyra" else "", "average", _num(cells[22]))
    # Tables 4 and 5: average only, two blocks (low, high)
    for table, big, small in (("4", "vit_l16_mae", "vit_b16_mae"), ("5", "deit_b16_distilled", "deit_s16_distilled")):
        block = -1
        for ln in section(f"Table {table}:"):
            cells = ln.split("\t")
            if len(cells) != 5 or cells[1] == "Method":
                continue
            method = _method(cells[1])
            if method == "peft":
                block += 1
            schedule = ("low", "high")[block]
            bb = small if (method == "peft" and block == 1) else big
            sched = "none" if method == "peft" else schedule
            variant = "full" if method == "pyra" else ""
            add(table, bb, sched, method, variant, "params_pct", _num(cells[2]))
            add(table, bb, sched, method, variant, "throughput", _num(cells[3]))
            add(table, bb, sched, method, variant, "average", _num(cells[4]))
    # Tables 6-8: group columns, ViT-B/16 high
    for table in ("6", "7", "8"):
        for ln in section(f"Table {table}:"):
            cells = ln.split("\t")
            if cells[0] not in ABLATION:
                continue
            method, variant = ABLATION[cells[0]]
            vals = cells[-5:]  # # params, Natural, Specialized, Structured, Average
            p = vals[0].strip()
            params = float(p[:-1]) * 1000 if p.endswith("K") else float(p)
            add(table, "vit_b16_in21k", "high", method, variant or "", "modulation_params", params)
            for col, v in zip(("natural", "specialized", "structured", "average"), vals[1:]):
                add(table, "vit_b16_in21k", "high", method, variant or "", col, _num(v))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paper", default=str(Path(__file__).resolve().parents[1].parent / "shared/paper/pyra_eccv2024.txt"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results/paper/paper_tables.csv"))
    a = ap.parse_args(argv)
    rows = parse(Path(a.paper).read_text())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} numbers to {a.out}")


if __name__ == "__main__":
    main()
