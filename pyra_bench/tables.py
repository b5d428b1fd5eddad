"""``python -m pyra_bench.tables``: the paper's Tables 2-8 and Figures 2/4 from run records, beside the
published numbers, plus every method and setting the records hold, and paired comparisons.

    python -m pyra_bench.tables records=results/runs out=results/tables          (conf/tables.yaml)
    python -m pyra_bench.tables metric=best tables=[2,3] formats=[md,tex]

**Rows.** One row per *group* of records: (backbone, method, the method's result-changing options
(``method_options``; its ``method_key``), operating point, ``run_tag``). The paper's rows come first, in the
paper's layout (``results/paper/paper_tables.csv``), each matched to the group with the same backbone,
method, options and operating point and no run tag (the paper's ablation variants of Tables 6-8 are the
option ``variant``; of groups that differ only in their method key, the one with today's key, the others
being rows of their own, labelled with their key). A group the paper does not have is a row of its own,
marked "not in the paper", in the block of its backbone and operating point of Tables 2-5; a group at an operating point no paper table
has goes to ``other_points``; records of tasks outside the 19 VTAB tasks to ``other_tasks`` (one section
per task set, a block per backbone). Records differing in a result-changing option are never averaged.

**Cells.** Mean +- sample standard deviation over seeds ("(n=k)" where a cell's seed count differs from
the table's usual one). "Average" is the paper's: the mean of the three group means (Natural 7 tasks,
Specialized 4, Structured 8); its spread (and the groups') is the std of the per-seed Averages, over the
seeds that ran on every task. A group (and so the Average) is missing unless every task has a record:
missing runs show as missing, never as zeros. Accuracy is the records' ``test_top1`` (last epoch, the VTAB
protocol) unless ``metric=best`` (best evaluated epoch, the paper's convention; labelled everywhere).
An entry with a record whose searched schedule missed its FLOPs budget by more than the method's tolerance
(``method_state.budget_miss``, DiffRate) carries "‡", explained below the table (CSV: "Off budget").

**Outputs** (``out``): ``table<N>.md|tex|csv`` and ``table<N>_vs_paper.md|tex|csv`` (measured, paper,
difference, "# params" and throughput included), ``other_points.*``, ``other_tasks.*``, ``paired.*`` and
``paired_tasks.*`` (:mod:`pyra_bench.stats`), ``tuning.*`` (val200 top-1 of ``protocol=tuning`` runs, which
never enter the other tables), ``tables.tex`` (a document that inputs every LaTeX table) and
``fig_<backbone>.png|pdf`` (:mod:`pyra_bench.figures`).

This module turns records into tables; what a table is (:class:`~pyra_bench.table_model.Group`, ``Cell``,
``Row``, ``Table``, the column order and the labels) is :mod:`pyra_bench.table_model`, which the renderers
(:mod:`pyra_bench.latex`, :mod:`pyra_bench.figures`) import without importing this module.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig

from . import paths
from .cli import hydra_app
from .errors import ConfigError, InputError, InputFileNotFoundError, exit_on_input_error
from .latex import escape, frame_to_latex, latex_document, table_to_latex
from .records import iter_records
from .table_model import (
    ABLATION_LABELS,
    KEY,
    NOT_IN_PAPER,
    OFF_BUDGET,
    STRATA,
    STRATA_OF,
    TASK_LABELS,
    TASKS,
    Cell,
    Group,
    Row,
    Table,
    backbone_display,
    method_display,
    setting_suffix,
    task_display,
)

TABLE_KIND = {"2": "tasks", "3": "tasks", "4": "average", "5": "average", "6": "groups", "7": "groups", "8": "groups"}
FORMATS = ("md", "tex", "csv")
METRICS = {"last": "test_top1", "best": "test_top1_best"}
METRIC_LABELS = {"last": "last-epoch top-1 (VTAB protocol)", "best": "BEST evaluated epoch top-1 (paper's convention)"}



# =============================================================================================================
# Records -> groups
# =============================================================================================================
def _null(v: Any) -> bool:
    return v is None or v in ("", "None", "null")


@functools.cache
def _option_default(method: str, option: str) -> Any:
    """The default of one constructor option of a registered method (``inspect.Parameter.empty`` if none)."""
    from .methods import method_class

    try:
        cls = method_class(method)
        if hasattr(cls, "option_defaults"):  # every class in the MRO (Method.option_defaults)
            return cls.option_defaults().get(option, inspect.Parameter.empty)
        param = inspect.signature(cls.__init__).parameters.get(option)
    except (InputError, TypeError, ValueError):
        return inspect.Parameter.empty
    return inspect.Parameter.empty if param is None else param.default


def paper_options(method: str, variant: str | None) -> dict[str, Any]:
    """The method options of a paper row (or an old record's ``variant``): ``{}`` for the method's default."""
    if _null(variant) or variant == _option_default(method, "variant"):
        return {}
    return {"variant": variant}


def _options_str(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=str)


def _run_tag(r: dict) -> str:
    """The record's ``run_tag``, with its non-default merge variants (``merge_split=random``) and a PEFT choice
    other than LoRA (``peft=adapter``) appended: such runs get rows of their own, named by them."""
    from .identity import peft_choice
    from .models.variants import MERGE_VARIANTS, variant_suffix

    tag = r.get("run_tag", (r.get("config") or {}).get("run_tag"))
    settings = r.get("settings") or {}
    variants = variant_suffix({k: settings.get(f"backbone.{k}") for k in MERGE_VARIANTS})[1:].replace("-", "+")
    peft = peft_choice({"name": settings.get("peft.name", ((r.get("config") or {}).get("peft") or {}).get("name"))})
    peft = "" if peft == "lora" else f"peft={peft}"
    return "+".join(t for t in ("" if _null(tag) else str(tag), variants, peft) if t)


def record_key(r: dict) -> dict[str, Any]:
    """A record's group: backbone, method, method_key, options, operating point, run_tag. Records from before
    ``method_options`` existed fall back to their ``variant``."""
    method = str(r.get("method"))
    options = r.get("method_options")
    if options is None:
        options = paper_options(method, r.get("variant"))
    key = r.get("method_key") or "-".join([method, *(str(v) for _, v in sorted(options.items()))])
    return {"backbone": str(r.get("backbone")), "method": method, "method_key": str(key),
            "options": _options_str(options), "schedule": str(r.get("schedule")), "run_tag": _run_tag(r)}


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


FRAME_COLUMNS = [*KEY, "task", "seed", "acc", "group", "task_label", "method_label", "backbone_label", "params_pct",
                 "method_params", "throughput", "gmacs", "weights", "device", "off_budget", "path"]


def record_problem(r: dict, field_: str) -> str | None:
    """Why a record cannot enter the tables (None if it can): its fields must have the documented types and
    ranges -- ``seed`` an integer (or absent), the accuracy ``metrics.<field_>`` a finite number in [0, 100]."""
    seed = r.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        return f"seed {seed!r} is not an integer"
    acc = (r.get("metrics") or {}).get(field_)
    if acc is not None and (isinstance(acc, bool) or not isinstance(acc, (int, float))
                            or not 0.0 <= float(acc) <= 100.0):
        return f"{field_} {acc!r} is not a number in [0, 100]"
    return None


def _record_rows(records: Iterable[dict], metric: str) -> tuple[list[dict[str, Any]], list[str]]:
    field_ = METRICS[metric]
    rows, problems = [], []
    for r in records:
        if r.get("protocol", "final") != "final":
            continue  # tuning runs: tuning_table
        name = r.get("_path") or r.get("run_id") or "?"
        if any(_null(r.get(k)) for k in ("task", "backbone", "method", "schedule")):
            problems.append(f"{name} (no task/backbone/method/schedule)")
            continue
        why = record_problem(r, field_)
        if why is not None:
            problems.append(f"{name} ({why})")
            continue
        acc = _num((r.get("metrics") or {}).get(field_))
        if acc is None:
            problems.append(f"{name} (no {field_})")
            continue
        params, tp = r.get("params") or {}, r.get("throughput") or {}
        w = r.get("weights")
        rows.append({**record_key(r), "task": str(r["task"]), "seed": int(r.get("seed") or 0), "acc": acc,
                     "group": str(r.get("group") or "other"), "task_label": r.get("task_label"),
                     "method_label": r.get("method_label"),
                     "backbone_label": r.get("backbone_label"), "params_pct": _num(params.get("paper_pct")),
                     "method_params": _num(params.get("method_paper")), "throughput": _num(tp.get("img_per_s")),
                     "gmacs": _num((r.get("flops") or {}).get("gmacs")),
                     "weights": None if w is None else json.dumps(w, sort_keys=True, default=str),
                     "device": tp.get("device"),
                     "off_budget": bool((r.get("method_state") or {}).get("budget_miss")), "path": name})
    return rows, problems


def records_frame(records: Iterable[dict], metric: str = "last") -> pd.DataFrame:
    """One row per final-protocol record with an accuracy: its group key (:func:`record_key`), task, seed,
    accuracy (``metric``), "# params", throughput, MACs."""
    return pd.DataFrame(_record_rows(records, metric)[0], columns=FRAME_COLUMNS)


def _group_rows(rows: Iterable[dict[str, Any]]) -> tuple[dict[tuple, Group], list[str]]:
    groups: dict[tuple, Group] = {}
    problems = []
    for row in rows:
        key = tuple(row[c] for c in KEY)
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(**{c: row[c] for c in KEY})
        task, seed = row["task"], int(row["seed"])
        if seed in g.values.get(task, {}):
            problems.append(f"{row['path']} (a second record of {task} seed {seed} in one row; the first is used)")
            continue
        g.values.setdefault(task, {})[seed] = float(row["acc"])
        g.groups_of[task] = row["group"]
        if not _null(row.get("task_label")):
            g.task_labels.setdefault(task, str(row["task_label"]))
        g.method_label = g.method_label or row["method_label"]
        g.backbone_label = g.backbone_label or row["backbone_label"]
        for attr in ("params_pct", "method_params", "throughput", "gmacs"):
            if _num(row[attr]) is not None:
                getattr(g, attr).append(float(row[attr]))
        if row["weights"]:
            g.weights.add(row["weights"])
        if row["device"]:
            g.devices.add(str(row["device"]))
        if row.get("off_budget") in (True, 1):
            g.off_budget.setdefault(task, set()).add(seed)
    return groups, problems


@functools.cache
def _canonical_method_key(method: str, options: str) -> str:
    """The method key today's runs record for these options (a :attr:`Group.options` string;
    :meth:`Method.run_key`; an unregistered method: the key :func:`record_key` gives records without one)."""
    from .methods import method_class

    opts = json.loads(options)
    try:
        return method_class(method).run_key(opts)
    except (InputError, TypeError, ValueError):
        return "-".join([method, *(str(v) for _, v in sorted(opts.items()))])


def by_paper_key(groups: Iterable[Group]) -> dict[tuple, Group]:
    """One group per :attr:`Group.paper_key`: the one a paper row (or a reference of the paired tables) stands
    for. Groups that share a paper key differ only in their method key (old and new records of one setting,
    or two method classes under one name): the one with today's key for its options wins, else the first by
    key; the others are rows of their own (:attr:`Group.shares_paper_key`), never dropped."""
    out: dict[tuple, Group] = {}
    for g in sorted(groups, key=lambda g: (g.method_key != _canonical_method_key(g.method, g.options), g.key)):
        out.setdefault(g.paper_key, g)
    return out


def group_records(records: Iterable[dict], metric: str = "last") -> tuple[dict[tuple, Group], list[str]]:
    """Final-protocol records with an accuracy, grouped by :func:`record_key` -> ({key: Group}, problems);
    a group whose paper key another group stands for is marked :attr:`Group.shares_paper_key`."""
    rows, problems = _record_rows(records, metric)
    groups, more = _group_rows(rows)
    first = by_paper_key(groups.values())
    for g in groups.values():
        g.shares_paper_key = first[g.paper_key] is not g
    return groups, problems + more


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per group of a :func:`records_frame`: the key, ``n_runs``, per-task means, the group means and
    the Average (with ``average_std`` / ``average_n`` over per-seed Averages), "# params", throughput, MACs."""
    groups, _ = _group_rows(frame.to_dict("records"))
    out = []
    for g in groups.values():
        row: dict[str, Any] = {c: getattr(g, c) for c in KEY}
        row["n_runs"] = sum(len(s) for s in g.values.values())
        row.update({t: g.cell(t).mean for t in g.values})
        for name, strata in STRATA_OF.items():
            c = g.mean_cell(strata)
            row[name] = c.mean
            if name == "average":
                row["average_std"], row["average_n"] = c.std, c.n
        row.update(params_pct=g.mean_params_pct, throughput=g.mean_throughput, gmacs=g.mean_gmacs)
        out.append(row)
    return pd.DataFrame(out)


# =============================================================================================================
# Tables
# =============================================================================================================
def _value_cols(kind: str) -> list[tuple[str, str, int]]:
    groups = [("natural", "Natural", 2), ("specialized", "Specialized", 2), ("structured", "Structured", 2)]
    avg = [("average", "Average", 2)]
    if kind == "tasks":
        return [(t, lab, 1) for t, lab in zip(TASKS, TASK_LABELS)] + groups + avg
    return groups + avg if kind == "groups" else avg


def _fmt_pct(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:.2f}%"


def _fmt_k(v: float) -> str:
    return "—" if math.isnan(v) else ("0" if v == 0 else f"{v / 1000:.2f}K")


def _fmt_int(v: float) -> str:
    return "—" if math.isnan(v) else f"{round(v)}"


def make_row(label: str, label_tex: str, g: Group | None, cols: list[tuple[str, str, int]], kind: str, *,
             block: str = "", backbone: str = "", schedule: str = "", ranked: bool = True, in_paper: bool = True,
             paper: dict[str, float] | None = None) -> Row:
    """A table row: the cells of ``cols`` from the group's records (missing without records), the cost
    columns, and how many tasks it covers."""
    row = Row(label, label_tex, block, backbone, schedule, ranked=ranked, in_paper=in_paper, group=g,
              paper=paper or {})
    for key, _, _ in cols:
        if g is None:
            row.cells[key] = Cell()
        elif key in STRATA_OF:
            row.cells[key] = g.mean_cell(STRATA_OF[key])
        elif key == "mean":  # other task sets: a plain mean over the set's tasks
            row.cells[key] = g.mean_cell([[k for k, _, _ in cols if k != "mean"]])
        else:
            row.cells[key] = g.cell(key)
    if kind == "groups":  # token-modulation parameters, in K as the paper reports them
        row.costs["# params"] = (g.mean_method_params if g else math.nan) / 1000
        row.costs["# params (paper)"] = row.paper.get("modulation_params", math.nan) / 1000
        row.text["# params"] = _fmt_k(row.costs["# params"] * 1000)
        row.text["# params (paper)"] = _fmt_k(row.costs["# params (paper)"] * 1000) if in_paper else ""
    else:
        row.costs["# params"] = g.mean_params_pct if g else math.nan
        row.costs["Throughput"] = g.mean_throughput if g else math.nan
        row.text["# params"] = _fmt_pct(row.costs["# params"])
        row.text["Throughput"] = _fmt_int(row.costs["Throughput"])
    tasks = TASKS if kind != "other" else [k for k, _, _ in cols if k != "mean"]
    row.text["Tasks"] = f"{sum(t in g.values for t in tasks) if g else 0}/{len(tasks)}"
    row.text["Note"] = "" if in_paper else NOT_IN_PAPER
    return row


def load_paper(path: Path | str = paths.PAPER_CSV) -> pd.DataFrame:
    p = pd.read_csv(path, dtype={"table": str}, keep_default_na=False)
    p["value"] = p["value"].astype(float)
    return p


@dataclass(frozen=True)
class PaperRow:
    table: str
    backbone: str
    method: str
    variant: str
    schedule: str
    values: dict[str, float]

    @property
    def key(self) -> tuple[str, ...]:
        """The :attr:`Group.paper_key` this row is matched to (no run tag: the plain setting)."""
        return (self.backbone, self.method, _options_str(paper_options(self.method, self.variant)), self.schedule, "")


def paper_rows(paper: pd.DataFrame) -> dict[str, list[PaperRow]]:
    out: dict[str, list[PaperRow]] = {}
    for (table, bb, method, variant, sched), g in paper.groupby(["table", "backbone", "method", "variant",
                                                                  "schedule"], sort=False):
        out.setdefault(table, []).append(PaperRow(table, bb, method, variant, sched, dict(zip(g.column, g.value))))
    return out


def _blocks(rows: list[PaperRow]) -> list[tuple[str, str]]:
    """(main backbone, operating point) of each paper row's block: an uncompressed row (PEFT, PEFT*) belongs
    to the block of the compressed rows below it."""
    return [next(((o.backbone, o.schedule) for o in rows[i:] if o.schedule != "none"), (r.backbone, r.schedule))
            for i, r in enumerate(rows)]


def _extra_label(g: Group, main: str, label_of: dict[str, str]) -> str:
    name = method_display(g) + setting_suffix(g)
    if g.backbone != main:
        name += f"* ({backbone_display(g.backbone, label_of.get(g.backbone))})"
    return name


def _extra_row(g: Group, block: str, main: str, cols, kind: str, label_of: dict[str, str],
               in_paper: bool = False) -> Row:
    name = _extra_label(g, main, label_of)
    return make_row(name, escape(name) + ("" if in_paper else r"$^\dagger$"), g, cols, kind, block=block,
                    backbone=backbone_display(g.backbone, g.backbone_label), schedule=g.schedule,
                    ranked=g.compressed, in_paper=in_paper)


def build_paper_table(table: str, rows: list[PaperRow], groups: dict[tuple, Group],
                      extras: dict[tuple[str, str], list[Group]], label: str) -> Table:
    """Table ``table`` in the paper's layout, each extra group at the end of its block."""
    kind = TABLE_KIND[table]
    cols = _value_cols(kind)
    by_paper = by_paper_key(groups.values())
    label_of = {g.backbone: g.backbone_label for g in groups.values() if g.backbone_label}
    blocks = _blocks(rows)
    out: list[Row] = []
    for i, (pr, (main, sched)) in enumerate(zip(rows, blocks)):
        g = by_paper.get(pr.key)
        name = method_display(g) if g is not None else method_display(pr.method)
        if kind == "groups":  # Tables 6-8: the ablation's label; the first row is the paper's baseline
            text, tex = ABLATION_LABELS.get(pr.variant, (None, None))
            if text is None:
                text = f"Baseline ({name})" if i == 0 else name
                tex = escape(text)
        else:
            text = name if pr.backbone == main else \
                f"{name}* ({backbone_display(pr.backbone, label_of.get(pr.backbone))})"
            tex = escape(text)
        block = backbone_display(main, label_of.get(main)) if table in ("2", "3") else (
            sched if kind == "average" else "")
        out.append(make_row(text, tex, g, cols, kind, block=block,
                            backbone=backbone_display(pr.backbone, label_of.get(pr.backbone)),
                            schedule=pr.schedule, ranked=pr.schedule != "none" or kind == "groups", paper=pr.values))
        if kind != "groups" and (i + 1 == len(rows) or blocks[i + 1] != (main, sched)):
            out += [_extra_row(eg, block, main, cols, kind, label_of) for eg in extras.get((main, sched), [])]
    text_cols = ["# params", "# params (paper)"] if kind == "groups" else ["# params", "Throughput"]
    t = Table(f"table{table}", f"Table {table} ({label})", cols, text_cols, out, kind=kind, wide=kind == "tasks")
    if kind == "groups":
        t.notes.append("# params: the token-modulation parameters only, as the paper reports them; ours beside "
                       "the paper's")
    if any(not r.in_paper for r in out):
        t.notes.append(f"† / Note: {NOT_IN_PAPER} (a method or setting the paper does not report)")
    return t


def place_extras(groups: dict[tuple, Group], prows: dict[str, list[PaperRow]]
                 ) -> tuple[dict[str, dict[tuple[str, str], list[Group]]], list[Group]]:
    """Groups the paper does not have (or whose paper row shows another group of their paper key, see
    :func:`by_paper_key`) -> ({table: {block: [groups]}} for Tables 2-5, the rest).

    A compressed group goes to the blocks of its (backbone, operating point); an uncompressed one to the
    first block of its backbone in each table."""
    in_paper = {pr.key for rows in prows.values() for pr in rows}
    matched = by_paper_key(groups.values())
    placed: dict[str, dict[tuple[str, str], list[Group]]] = {}
    rest = []
    for g in sorted(groups.values(), key=lambda g: (not g.compressed, g.key)):
        if (g.paper_key in in_paper and matched[g.paper_key] is g) or not g.vtab():
            continue
        homes = []
        for table, rows in prows.items():
            if TABLE_KIND.get(table) in (None, "groups"):
                continue
            blocks = list(dict.fromkeys(_blocks(rows)))
            hit = [b for b in blocks if b == (g.backbone, g.schedule)] if g.compressed else \
                [b for b in blocks if b[0] == g.backbone][:1]
            homes += [(table, b) for b in hit]
        for table, b in homes:
            placed.setdefault(table, {}).setdefault(b, []).append(g)
        if not homes:
            rest.append(g)
    return placed, rest


def other_points_table(rest: list[Group], groups: dict[tuple, Group], label: str) -> Table | None:
    """Groups at operating points no paper table has: a block per (backbone, operating point), headed by the
    backbone's uncompressed rows (PEFT) as reference."""
    if not rest:
        return None
    cols = _value_cols("tasks")
    label_of = {g.backbone: g.backbone_label for g in groups.values() if g.backbone_label}
    in_rest = {g.key for g in rest}
    rows: list[Row] = []
    for bb in sorted({g.backbone for g in rest}):
        refs = sorted((g for g in groups.values() if g.backbone == bb and not g.compressed and g.vtab()),
                      key=lambda g: g.key)
        points = sorted({g.schedule for g in rest if g.backbone == bb and g.compressed}) or ["none"]
        for p in points:
            block = f"{backbone_display(bb, label_of.get(bb))}, {p}"
            members = refs + sorted((g for g in rest if g.backbone == bb and g.schedule == p and g.compressed),
                                    key=lambda g: g.key)
            rows += [_extra_row(g, block, bb, cols, "tasks", label_of, in_paper=g.key not in in_rest)
                     for g in members]
    t = Table("other_points", f"Operating points no paper table has ({label})", cols, ["# params", "Throughput"],
              rows, kind="tasks", wide=True)
    t.notes.append(f"† / Note: {NOT_IN_PAPER}")
    return t


def other_tasks_tables(groups: dict[tuple, Group], label: str) -> list[Table]:
    """Records of tasks outside the 19 VTAB tasks: a table per task set (the records' ``group``), a block per
    backbone, the set's tasks and their mean as columns."""
    sets: dict[str, set[str]] = {}
    for g in groups.values():
        for t, s in g.groups_of.items():
            if t not in TASKS:
                sets.setdefault(s, set()).add(t)
    out = []
    for s in sorted(sets):
        tasks = sorted(sets[s])
        cols = [(t, task_display(t, groups.values()), 1) for t in tasks] + [("mean", "Mean", 2)]
        members = sorted((g for g in groups.values() if any(t in g.values for t in tasks)),
                         key=lambda g: (g.backbone, g.compressed, g.schedule, g.key))
        rows = []
        for g in members:
            name = method_display(g) + setting_suffix(g)
            bb = backbone_display(g.backbone, g.backbone_label)
            rows.append(make_row(name, escape(name), g, cols, "other", block=bb, backbone=bb, schedule=g.schedule,
                                 ranked=g.compressed))
            rows[-1].text["Note"] = ""
        t = Table(f"other_tasks_{s}", f"Tasks outside VTAB-1k, task set {s!r} ({label})", cols,
                  ["# params", "Throughput"], rows, kind="other", wide=len(cols) > 8)
        t.notes.append("Mean: the mean over the set's tasks (missing unless every task has a record)")
        out.append(t)
    return out


def with_paper_beside(table: Table) -> Table:
    """``table`` with the published numbers in it (``paper_beside=true``): below each paper row, the paper's
    row ("<label> — paper") and the difference ("<label> — Δ", ours minus paper); both unranked, so the best
    / second-best marks stay those of our rows."""
    rows: list[Row] = []
    for r in table.rows:
        rows.append(r)
        if not r.in_paper:
            continue
        paper_cells = {k: Cell(r.paper.get(k, math.nan)) for k, _, _ in table.value_cols}
        diff_cells = {k: Cell(r.cells[k].mean - c.mean) for k, c in paper_cells.items()}
        for suffix, tex, cells, costs in (
                ("paper", "paper", paper_cells, {"# params": r.paper.get("params_pct", math.nan),
                                                 "Throughput": r.paper.get("throughput", math.nan)}),
                ("Δ", r"$\Delta$", diff_cells, {})):
            extra = Row(f"{r.label} — {suffix}", f"{r.label_tex} --- {tex}", r.block, r.backbone, r.schedule, cells=cells, ranked=False, in_paper=True, paper=r.paper)
            if table.kind == "groups":
                p = r.paper.get("modulation_params", math.nan)
                extra.text["# params"] = _fmt_k(p) if suffix == "paper" else ""
                extra.text["# params (paper)"] = ""
            else:
                extra.costs.update(costs)
                extra.text["# params"] = _fmt_pct(costs.get("# params", math.nan)) if costs else ""
                extra.text["Throughput"] = _fmt_int(costs.get("Throughput", math.nan)) if costs else ""
            extra.text["Note"] = "published" if suffix == "paper" else "ours − paper"
            rows.append(extra)
    return Table(table.name, table.title + " (with the paper's rows)", table.value_cols, table.text_cols, rows,
                 table.kind, table.wide, [*table.notes, "— paper: the published numbers; — Δ: ours minus paper"])


def vs_paper(table: Table) -> pd.DataFrame:
    """Measured beside published, per paper row and column: the values, "# params" and throughput."""
    out = []
    for r in table.rows:
        if not r.in_paper:
            continue
        base = {"Method": r.label, "Backbone": r.backbone, "Schedule": r.schedule}

        def add(col: str, m: float, std: float, n: int, p: float, base: dict = base) -> None:
            out.append({**base, "Column": col, "measured": m, "std": std, "n": n, "paper": p, "diff": m - p})

        for key, lab, _ in table.value_cols:
            if key in r.paper or key == "average":
                c = r.cells[key]
                add(lab, c.mean, c.std, c.n, r.paper.get(key, math.nan))
        g = r.group
        if table.kind == "groups":
            add("# params (K)", (g.mean_method_params if g else math.nan) / 1000, math.nan,
                len(g.method_params) if g else 0, r.paper.get("modulation_params", math.nan) / 1000)
        else:
            add("# params (%)", g.mean_params_pct if g else math.nan, math.nan, len(g.params_pct) if g else 0,
                r.paper.get("params_pct", math.nan))
            add("Throughput", g.mean_throughput if g else math.nan, math.nan, len(g.throughput) if g else 0,
                r.paper.get("throughput", math.nan))
    return pd.DataFrame(out, columns=["Method", "Backbone", "Schedule", "Column", "measured", "std", "n", "paper",
                                      "diff"])


# =============================================================================================================
# Paired comparisons
# =============================================================================================================
def paired_comparisons(groups: dict[tuple, Group], reference: str | None, also: dict[str, list[str]],
                       resample: str = "seeds", n_resamples: int = 10000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each row against its references (:mod:`pyra_bench.stats`) -> (summary frame, per-task frame).

    References of a row: ``reference`` and the methods in ``also[<the row's method>]``, each with its default
    options, at the row's backbone and operating point (the row's run tag if such records exist, else none);
    a reference without records there is taken uncompressed (PEFT). Only VTAB tasks take part."""
    from .stats import compare

    vtab = [g for g in groups.values() if g.vtab()]
    by_paper = by_paper_key(vtab)  # the references

    def find(g: Group, method: str) -> Group | None:
        for sched in dict.fromkeys((g.schedule, "none")):
            for tag in dict.fromkeys((g.run_tag, "")):
                ref = by_paper.get((g.backbone, method, "{}", sched, tag))
                if ref is not None:
                    return ref
        return None

    summary, per_task = [], []
    for g in sorted(vtab, key=lambda g: g.key):
        for ref_method in dict.fromkeys(([reference] if reference else []) + list(also.get(g.method, []))):
            ref = find(g, ref_method)
            if ref is None or ref is g or (ref.compressed and not g.compressed):
                continue
            res = compare(g.vtab(), ref.vtab(), STRATA, resample, n_resamples, confidence, seed)
            if res.n_tasks == 0:
                continue
            a, b = method_display(g) + setting_suffix(g), method_display(ref) + setting_suffix(ref)
            what = "Average" if res.n_tasks == len(TASKS) else f"mean of {res.n_tasks} tasks"
            lo, hi = res.ci
            bb = backbone_display(g.backbone, g.backbone_label)
            ci = f"[{lo:+.2f}, {hi:+.2f}]" if not math.isnan(lo) else "[no CI]"
            sentence = (f"{a} − {b} ({bb}, {g.schedule}): {res.difference:+.2f} {ci} on the {what}, "
                        f"better on {res.better} of {res.n_tasks} tasks (Wilcoxon p = {res.wilcoxon_p:.3g})")
            head = {"Backbone": bb, "Operating point": g.schedule, "Comparison": f"{a} − {b}"}
            summary.append({**head, "Over": what, "Difference": res.difference, "CI low": lo, "CI high": hi,
                            "CI over": res.basis, "Better on": res.better, "Worse on": res.worse,
                            "Tasks": res.n_tasks, "Wilcoxon p": res.wilcoxon_p,
                            "Seeds": f"{_seed_range(res.seeds_a)} vs {_seed_range(res.seeds_b)}",
                            "Sentence": sentence})
            per_task.append({**head, **{lab: res.per_task.get(t, math.nan) for t, lab in zip(TASKS, TASK_LABELS)}})
    cols = ["Backbone", "Operating point", "Comparison", "Over", "Difference", "CI low", "CI high", "CI over",
            "Better on", "Worse on", "Tasks", "Wilcoxon p", "Seeds", "Sentence"]
    return (pd.DataFrame(summary, columns=cols),
            pd.DataFrame(per_task, columns=["Backbone", "Operating point", "Comparison", *TASK_LABELS]))


def _seed_range(counts: dict[str, int]) -> str:
    """Seeds per task of one side of a comparison: "3", or "2-3" where tasks differ."""
    ns = sorted(set(counts.values()))
    return f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"

# =============================================================================================================
# Tuning runs
# =============================================================================================================
TUNING_KEY = ["backbone", "method_key", "schedule"]


def tuning_table(records: Iterable[dict]) -> pd.DataFrame:
    """val200 top-1 of the tuning runs: one row per (backbone, method_key, schedule, run_tag), one column per
    task (seeds averaged), and a ``best`` row per (backbone, method_key, schedule) naming the best tag of
    each task."""
    rows = []
    for r in records:
        acc = _num((r.get("metrics") or {}).get("val_top1"))
        if r.get("protocol") != "tuning" or acc is None:
            continue
        why = record_problem(r, "val_top1")
        if why is not None:
            _warn(f"{r.get('_path') or r.get('run_id')} left out of the tuning table ({why})")
            continue
        k = record_key(r)
        rows.append({**{c: k[c] for c in TUNING_KEY}, "run_tag": k["run_tag"] or "-", "task": r.get("task"),
                     "acc": acc})
    if not rows:
        return pd.DataFrame(columns=[*TUNING_KEY, "run_tag"])
    df = pd.DataFrame(rows)
    wide = df.pivot_table(index=[*TUNING_KEY, "run_tag"], columns="task", values="acc", aggfunc="mean")
    wide = wide[[t for t in TASKS + sorted(set(wide.columns) - set(TASKS)) if t in wide.columns]]
    out = []
    for key, g in wide.groupby(level=list(range(len(TUNING_KEY))), sort=True):
        block = g.reset_index()
        out.append(block)
        best = {c: block.loc[block[c].idxmax(), "run_tag"] if block[c].notna().any() else None for c in g.columns}
        out.append(pd.DataFrame([{**dict(zip(TUNING_KEY, key)), "run_tag": "best", **best}]))
    return pd.concat(out, ignore_index=True)


# =============================================================================================================
# Writing
# =============================================================================================================
def _fmt_cell(c: Cell, dec: int, usual_n: int) -> str:
    if c.missing:
        return "—"
    s = f"{c.mean:.{dec}f}" + ("" if math.isnan(c.std) else f" ± {c.std:.{dec}f}")
    return s + (f" (n={c.n})" if c.n != usual_n else "")


def table_frame(t: Table) -> pd.DataFrame:
    """The machine-readable table: numbers as numbers (the mean, then "<column> std" and "<column> n"; "# params"
    in % of the backbone, or in K for Tables 6-8); "Off budget": the columns whose entry carries
    :data:`OFF_BUDGET`."""
    out = []
    for r in t.rows:
        g = r.group
        row = {"Block": r.block, "Method": r.label, "Backbone": r.backbone, "Schedule": r.schedule,
               "Method key": g.method_key if g else "", "Options": g.options if g else "",
               "Run tag": g.run_tag if g else "", **{c: r.costs.get(c, math.nan) for c in t.text_cols}}
        for key, lab, _ in t.value_cols:
            c = r.cells[key]
            row[lab], row[f"{lab} std"], row[f"{lab} n"] = c.mean, c.std, c.n
        row["Tasks"], row["Note"] = r.text.get("Tasks", ""), r.text.get("Note", "")
        row["Off budget"] = "; ".join(lab for key, lab, _ in t.value_cols if r.cells[key].off_budget)
        out.append(row)
    return pd.DataFrame(out)


def to_markdown(t: Table) -> str:
    """Markdown: mean ± std per entry, **best** and _second best_ per block, :data:`OFF_BUDGET` marks, notes
    below."""
    n = t.usual_n()
    rows = []
    for r in t.rows:
        row = {"Block": r.block, "Method": r.label, **{c: r.text.get(c, "") for c in t.text_cols}}
        for key, lab, dec in t.value_cols:
            s = _fmt_cell(r.cells[key], dec, n)
            mark = r.marks.get(key)
            row[lab] = (f"**{s}**" if mark == "best" else (f"_{s}_" if mark == "second" else s)) + \
                (f" {OFF_BUDGET}" if r.cells[key].off_budget else "")
        row["Tasks"], row["Note"] = r.text.get("Tasks", ""), r.text.get("Note", "")
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df) and not (df["Block"] != "").any():
        df = df.drop(columns="Block")
    notes = [x for x in [t.seed_note(), "**best** and _second best_ within each block (compressed rows)", *t.notes,
                         t.budget_note()] if x]
    body = df.to_markdown(index=False) if len(df) else "(no rows)"
    return f"## {t.title}\n\n{body}\n\n" + "\n".join(f"- {x}" for x in notes) + "\n"


def write_frame(df: pd.DataFrame, out: Path, name: str, formats: set[str], title: str,
                tex_drop: Sequence[str] = ()) -> list[Path]:
    """A plain frame (vs-paper, paired, tuning) as CSV / Markdown / LaTeX (without the ``tex_drop`` columns)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if "csv" in formats:
        df.to_csv(out / f"{name}.csv", index=False)
        written.append(out / f"{name}.csv")
    if "md" in formats:
        body = df.to_markdown(index=False, floatfmt=".2f") if len(df) else "(no rows)"
        (out / f"{name}.md").write_text(f"## {title}\n\n{body}\n")
        written.append(out / f"{name}.md")
    if "tex" in formats:
        (out / f"{name}.tex").write_text(frame_to_latex(df.drop(columns=list(tex_drop)), title, name))
        written.append(out / f"{name}.tex")
    return written


def write_table(t: Table, out: Path, formats: set[str]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, render in (("csv", None), ("md", to_markdown), ("tex", table_to_latex)):
        if fmt not in formats:
            continue
        path = out / f"{t.name}.{fmt}"
        if render is None:
            table_frame(t).to_csv(path, index=False)
        else:
            path.write_text(render(t))
        written.append(path)
    return written

# =============================================================================================================
# The command
# =============================================================================================================
def _as_list(v: Any) -> list:
    if v is None:
        return []
    if isinstance(v, (str, int, float)):
        return [v]
    return list(v)


@dataclass(frozen=True)
class Options:
    records: list[str]
    out: Path
    tables: list[str]
    metric: str
    formats: set[str]
    paper: Path
    figures: bool
    figure_methods: list[str] | None  # None: every compressing method and variant with records
    paper_beside: bool
    reference: str | None
    also: dict[str, list[str]]
    resample: str
    n_resamples: int
    confidence: float
    seed: int


def check_options(cfg: Any) -> Options:
    """Validate the config before anything is read or written (:class:`~pyra_bench.errors.ConfigError`)."""
    from . import schema
    from .stats import RESAMPLING

    tables = [str(t).strip() for t in _as_list(cfg.get("tables"))]
    bad = [t for t in tables if t not in TABLE_KIND]
    if bad or not tables:
        raise ConfigError(f"unknown table {bad[0]!r}; valid choices: {', '.join(TABLE_KIND)}" if bad else
                          f"tables= is empty; valid choices: {', '.join(TABLE_KIND)}")
    formats = {str(f).strip() for f in _as_list(cfg.get("formats"))}
    if not formats or formats - set(FORMATS):
        raise ConfigError(f"unknown format(s) {', '.join(sorted(formats - set(FORMATS))) or '(none)'}; "
                          f"valid choices: {', '.join(FORMATS)}")
    metric = str(cfg.get("metric"))
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; valid choices: {', '.join(METRICS)}")
    paper = Path(cfg.get("paper") or paths.PAPER_CSV)
    if not paper.is_file():
        raise InputFileNotFoundError(f"the paper's numbers are missing: {paper} (rebuild with "
                                     f"scripts/transcribe_paper.py, or set paper=<csv>)")
    p = cfg.get("paired") or {}
    resample = str(p.get("resample", "seeds"))
    if resample not in RESAMPLING:
        raise ConfigError(f"unknown paired.resample {resample!r}; valid choices: {', '.join(RESAMPLING)}")
    schema.check(cfg, schema.Tables, "tables config")  # the numbers and the output folder
    also = {str(k): [str(x) for x in _as_list(v)] for k, v in dict(p.get("also") or {}).items()}
    fm = [str(m).strip() for m in _as_list(cfg.get("figure_methods", ["tome", "pyra"]))]
    if not fm or "" in fm:
        raise ConfigError("figure_methods= is empty; give method names or method keys (e.g. [tome,pyra] or "
                          "[pyra,pyra-wd_sigmoid]), or all")
    records = [str(r) for r in _as_list(cfg.get("records"))]
    if not records:
        raise ConfigError("records= is empty; give a folder or file of run records, e.g. records=results/runs")
    return Options(records, Path(str(cfg.get("out"))), tables, metric, formats, paper,
                   bool(cfg.get("figures", True)), None if fm == ["all"] else fm, bool(cfg.get("paper_beside", False)),
                   None if _null(p.get("reference")) else str(p.get("reference")),
                   also, resample, int(p.get("n_resamples", 10000)), float(p.get("confidence", 0.95)),
                   int(p.get("seed", 0)))


def _warn(msg: str) -> None:
    print(f"[tables] warning: {msg}", file=sys.stderr)


def build(o: Options) -> list[Path]:
    """Everything ``python -m pyra_bench.tables`` writes, for validated options; returns the files."""
    for r in o.records:
        if not Path(r).exists():
            _warn(f"{r} does not exist; no records read from it")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recs = iter_records(o.records)
    if not recs and caught:  # files, but not one record: the wrong folder (an empty one gives the paper's rows)
        raise ConfigError(f"records={','.join(o.records)} holds no run record: {'; '.join(str(w.message) for w in caught)}"
                          f". Point records= at the runs' results_dir (results/runs by default)")
    for w in caught:
        _warn(str(w.message))
    groups, problems = group_records(recs, o.metric)
    if problems:
        _warn(f"{len(problems)} record(s) left out of the tables: {'; '.join(problems[:10])}"
              + (" ..." if len(problems) > 10 else ""))
    label = METRIC_LABELS[o.metric]
    print(f"[tables] {len(recs)} records, {sum(len(s) for g in groups.values() for s in g.values.values())} with "
          f"accuracy, in {len(groups)} rows; metric: {label}")
    devices = sorted({d for g in groups.values() for d in g.devices})
    if len(devices) > 1:
        _warn(f"throughput was measured on {len(devices)} devices ({'; '.join(devices)}); the columns mix them. "
              f"Measure every run on one device: python -m pyra_bench.bench bench.run='outputs/runs/*' bench.device=cuda")
    for g in groups.values():
        if len(g.weights) > 1:
            _warn(f"row {g.method_key} / {g.backbone} / {g.schedule} mixes backbone weights: {', '.join(sorted(g.weights))}")
    prows = paper_rows(load_paper(o.paper))
    extras, rest = place_extras(groups, prows)
    written: list[Path] = []
    tex_tables: list[str] = []
    for t in o.tables:
        table = build_paper_table(t, prows[t], groups, extras.get(t, {}), label)
        table.mark_best()
        written += write_table(with_paper_beside(table) if o.paper_beside else table, o.out, o.formats)
        written += write_frame(vs_paper(table), o.out, f"{table.name}_vs_paper", o.formats,
                               f"Table {t}: measured vs paper ({label})")
        tex_tables += [table.name, f"{table.name}_vs_paper"]
        n_extra = sum(not r.in_paper for r in table.rows)
        filled = sum(not r.cells["average"].missing for r in table.rows)
        print(f"[tables] table {t}: {len(table.rows)} rows ({n_extra} not in the paper), {filled} with a complete "
              f"Average -> {o.out}/{table.name}.*")
    for table in [other_points_table(rest, groups, label), *other_tasks_tables(groups, label)]:
        if table is None:
            continue
        table.mark_best()
        written += write_table(table, o.out, o.formats)
        tex_tables.append(table.name)
        print(f"[tables] {table.name}: {len(table.rows)} rows -> {o.out}/{table.name}.*")
    summary, per_task = paired_comparisons(groups, o.reference, o.also, o.resample, o.n_resamples, o.confidence,
                                           o.seed)
    if len(summary):
        written += write_frame(summary, o.out, "paired", o.formats,
                               f"Paired comparisons ({label}; {round(100 * o.confidence)}% bootstrap CI, "
                               f"Wilcoxon signed-rank over tasks)", tex_drop=["Sentence"])
        written += write_frame(per_task, o.out, "paired_tasks", o.formats,
                               f"Per-task paired differences ({label})")
        tex_tables += ["paired", "paired_tasks"]
        for s in summary["Sentence"]:
            print(f"[tables] {s}")
    tuning = tuning_table(recs)
    if len(tuning):
        written += write_frame(tuning, o.out, "tuning", o.formats & {"md", "csv"},
                               "Tuning runs: val200 top-1 (train800 -> val200)")
        print(f"[tables] tuning: {int((tuning['run_tag'] != 'best').sum())} settings -> {o.out}/tuning.*")
    if "tex" in o.formats and tex_tables:
        (o.out / "tables.tex").write_text(latex_document(tex_tables))
        written.append(o.out / "tables.tex")
    if o.figures:
        from .figures import draw_figures

        for p in draw_figures(list(groups.values()), o.out, label, o.figure_methods):
            print(f"[tables] figure -> {p}")
            written.append(p)
    return written


def run(cfg: Any) -> list[Path]:
    """Check the config, then build (what the Hydra entry point calls; tests call it with a composed config)."""
    return build(check_options(cfg))


@hydra_app(config_path=str(paths.CONF_DIR), config_name="tables")  # hydra.main; --help alone: info.fast_help
def main(cfg: DictConfig) -> None:
    """``python -m pyra_bench.tables [key=value ...]`` (``pyra-tables``): see ``conf/tables.yaml``."""
    try:
        run(cfg)
    except InputError as e:
        exit_on_input_error(e, "python -m pyra_bench.tables")


if __name__ == "__main__":
    # Run the package's module, not this ``__main__`` copy of it: the figures and LaTeX renderers import
    # ``pyra_bench.tables``, and a second copy's classes (Group, Table) would not be theirs.
    from pyra_bench.tables import main as _main

    _main()
