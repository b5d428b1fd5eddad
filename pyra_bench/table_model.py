"""The table model: what a results table is, apart from how records become one (:mod:`pyra_bench.tables`)
and how it is drawn (:mod:`pyra_bench.latex`, :mod:`pyra_bench.figures`, Markdown and CSV in ``tables``).

- the columns: the 19 VTAB-1k tasks in the paper's order with their titles, and the three strata
  (Natural, Specialized, Structured) whose means make the paper's Average;
- :class:`Group`: the records of one row (backbone, method, method key, options, operating point, run tag),
  accuracies per task and seed, and measured costs; :class:`Cell`: one entry (mean, std, seeds);
- :class:`Row` and :class:`Table`: a table's rows, columns, notes and the best / second-best marks;
- the labels: how tables and figures name methods, backbones, tasks and a row's settings.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .data.tasks import GROUPS, VTAB_TASKS
from .data.tasks import TASKS as TASK_REGISTRY
from .stats import mean_std, per_seed_means, stratified_mean

TASKS: list[str] = list(VTAB_TASKS)
TASK_LABELS: list[str] = [TASK_REGISTRY.get(t).display for t in TASKS]
STRATA: list[list[str]] = [GROUPS[g] for g in ("natural", "specialized", "structured")]
#: The column keys that are means over strata, with their strata.
STRATA_OF = {"natural": [GROUPS["natural"]], "specialized": [GROUPS["specialized"]],
             "structured": [GROUPS["structured"]], "average": STRATA}
#: The note of a row the paper does not have.
NOT_IN_PAPER = "not in the paper"

# -- the paper's own naming (mapping data for the paper's rows and old records, not a method table) ---------
#: How the paper names its rows; used only where neither the method class nor the records name the method.
PAPER_METHOD_LABELS = {"peft": "PEFT", "rap": "RaP", "spvit": "SPViT", "diffrate": "DiffRate", "tome": "ToMe",
                       "pyra": "PYRA"}
#: Tables 6-8 row labels, by the paper's ``variant`` column: (text, LaTeX).
ABLATION_LABELS = {"wr": ("Plain W_r", r"Plain $W_r$"),
                   "wr_sigmoid": ("σ(·) & W_r", r"$\sigma(\cdot)$ \& $W_r$"),
                   "wd": ("Plain W_D", r"Plain $W_D$"),
                   "wd_sigmoid": ("σ(·) & W_D", r"$\sigma(\cdot)$ \& $W_D$"),
                   "wrwd_plain": ("Plain W_r & W_D", r"Plain $W_r$ \& $W_D$"),
                   "direct": ("W_{D×r}", r"$W_{D \times r}^l$"),
                   "gated": ("Gated", "Gated")}
#: Display names of the paper's backbones, for records that do not carry ``backbone_label``.
BACKBONE_LABELS = {"vit_b16_in21k": "ViT-B/16", "vit_l16_in21k": "ViT-L/16", "vit_s16_in21k": "ViT-S/16",
                   "vit_l16_mae": "ViT-L (MAE)", "vit_b16_mae": "ViT-B (MAE)", "deit_b16_distilled": "DeiT-B",
                   "deit_s16_distilled": "DeiT-S"}


KEY = ["backbone", "method", "method_key", "options", "schedule", "run_tag"]
PAPER_KEY = ["backbone", "method", "options", "schedule", "run_tag"]  # what a paper row is matched on
#: Marks an entry with a record whose searched schedule missed its FLOPs budget by more than the method's
#: tolerance (``method_state.budget_miss``, DiffRate); explained below the table.
OFF_BUDGET = "‡"
OFF_BUDGET_NOTE = (f"{OFF_BUDGET}: the searched schedule of at least one seed is further than the method's "
                   "tolerance from its FLOPs budget (budget_miss in the run record)")


@dataclass
class Cell:
    """One table entry: mean, sample std and number of seeds (NaN / 0 when missing); ``off_budget``: a record
    behind it missed its FLOPs budget (:data:`OFF_BUDGET`)."""

    mean: float = math.nan
    std: float = math.nan
    n: int = 0
    off_budget: bool = False

    @property
    def missing(self) -> bool:
        return math.isnan(self.mean)


@dataclass
class Group:
    """The records of one row: accuracies per task and seed, and the model's measured costs."""

    backbone: str
    method: str
    method_key: str
    options: str
    schedule: str
    run_tag: str
    values: dict[str, dict[int, float]] = field(default_factory=dict)
    groups_of: dict[str, str] = field(default_factory=dict)  # task -> task set (record "group")
    task_labels: dict[str, str] = field(default_factory=dict)  # task -> column title (record "task_label")
    method_label: str | None = None
    backbone_label: str | None = None
    params_pct: list[float] = field(default_factory=list)
    method_params: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    gmacs: list[float] = field(default_factory=list)
    weights: set[str] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    off_budget: dict[str, set[int]] = field(default_factory=dict)  # task -> seeds whose record missed its budget
    #: another group of the same paper key is the one :func:`by_paper_key` takes: labels name this one's
    #: method key so that the rows tell apart (set by :func:`group_records`)
    shares_paper_key: bool = False

    @property
    def key(self) -> tuple[str, ...]:
        return tuple(getattr(self, k) for k in KEY)

    @property
    def paper_key(self) -> tuple[str, ...]:
        return tuple(getattr(self, k) for k in PAPER_KEY)

    @property
    def option_dict(self) -> dict[str, Any]:
        return json.loads(self.options)

    @property
    def compressed(self) -> bool:
        return self.schedule not in ("none", "None", "0")

    def vtab(self) -> dict[str, dict[int, float]]:
        return {t: v for t, v in self.values.items() if t in TASKS}

    def cell(self, task: str) -> Cell:
        return Cell(*mean_std(list(self.values.get(task, {}).values())), off_budget=task in self.off_budget)

    def mean_cell(self, strata: Sequence[Sequence[str]]) -> Cell:
        """The mean of stratum means (a VTAB group mean, the Average); spread over per-seed values."""
        per_task = {t: self.cell(t).mean for s in strata for t in s}
        seeds = per_seed_means(self.values, strata)
        _, std, n = mean_std(list(seeds.values()))
        return Cell(stratified_mean(per_task, strata), std, n,
                    off_budget=any(t in self.off_budget for s in strata for t in s))

    def _mean(self, xs: list[float]) -> float:
        return float(sum(xs) / len(xs)) if xs else math.nan

    @property
    def mean_params_pct(self) -> float:
        return self._mean(self.params_pct)

    @property
    def mean_method_params(self) -> float:
        return self._mean(self.method_params)

    @property
    def mean_throughput(self) -> float:
        return self._mean(self.throughput)

    @property
    def mean_gmacs(self) -> float:
        return self._mean(self.gmacs)


# =============================================================================================================
# Labels
# =============================================================================================================
def method_display(g_or_method: Group | str, record_label: str | None = None) -> str:
    """The method's name in tables and figures: the class's ``display_name``, else the records'
    ``method_label``, else the paper's name for it, else the registered name."""
    from .methods import display_name

    if not isinstance(g_or_method, str):  # a Group (duck-typed: robust to a module loaded twice)
        method, record_label = g_or_method.method, g_or_method.method_label
    else:
        method = g_or_method
    fallback = record_label if record_label and record_label != method else PAPER_METHOD_LABELS.get(method)
    return display_name(method, fallback)


def backbone_display(name: str, record_label: str | None = None) -> str:
    """A backbone's name in tables and figures: the records' ``backbone_label``, else the paper's name."""
    return record_label if record_label and record_label != name else BACKBONE_LABELS.get(name, name)


def task_display(task: str, groups: Iterable[Group] = ()) -> str:
    """A task's column title: its records' ``task_label`` (the task config's ``display``: config-only folder
    tasks are in no registry), else the registered task's, else its name."""
    label = next((g.task_labels[task] for g in groups if task in g.task_labels), None)
    if label:
        return label
    return TASK_REGISTRY.get(task).display if task in TASK_REGISTRY else task


def setting_suffix(g: Group) -> str:
    """`` (options) [run tag]`` of a row's label, with the method key when another row differs from this one
    only in it (:attr:`Group.shares_paper_key`)."""
    opts = [f"{k}={v}" for k, v in sorted(g.option_dict.items())] + (
        [f"method key {g.method_key}"] if g.shares_paper_key else [])
    return (f" ({', '.join(opts)})" if opts else "") + (f" [{g.run_tag}]" if g.run_tag else "")


# =============================================================================================================
# Tables
# =============================================================================================================
@dataclass
class Row:
    label: str
    label_tex: str
    block: str = ""
    backbone: str = ""
    schedule: str = ""
    cells: dict[str, Cell] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)    # shown as is ("# params", "Throughput", "Note")
    costs: dict[str, float] = field(default_factory=dict)  # the numbers behind text columns (CSV)
    ranked: bool = True          # takes part in the best / second-best marking of its block
    in_paper: bool = True
    group: Group | None = None
    paper: dict[str, float] = field(default_factory=dict)  # the published numbers, by column key
    marks: dict[str, str] = field(default_factory=dict)    # column -> "best" | "second"


@dataclass
class Table:
    name: str
    title: str
    value_cols: list[tuple[str, str, int]]  # (key, label, decimals); ranked, higher is better
    text_cols: list[str]                    # shown before the values ("# params", "Throughput")
    rows: list[Row]
    kind: str = "tasks"                     # tasks | average | groups (Tables 6-8: token-modulation # params)
    wide: bool = False                      # LaTeX table* (full text width)
    notes: list[str] = field(default_factory=list)

    def mark_best(self) -> None:
        """Bold the best and underline the second-best entry of each column within each block (by the value
        as shown, so shown ties are marked alike)."""
        for block in dict.fromkeys(r.block for r in self.rows):
            rows = [r for r in self.rows if r.block == block and r.ranked]
            for key, _, dec in self.value_cols:
                present = [r for r in rows if not r.cells[key].missing]
                if len(present) < 2:
                    continue
                vals = sorted({round(r.cells[key].mean, dec) for r in present}, reverse=True)
                for r in present:
                    v = round(r.cells[key].mean, dec)
                    if v == vals[0]:
                        r.marks[key] = "best"
                    elif len(vals) > 1 and v == vals[1]:
                        r.marks[key] = "second"

    def usual_n(self) -> int:
        counts = Counter(c.n for r in self.rows for c in r.cells.values() if c.n)
        return counts.most_common(1)[0][0] if counts else 0

    def seed_note(self) -> str:
        n = self.usual_n()
        ns = {c.n for r in self.rows for c in r.cells.values() if c.n}
        if not ns:
            return ""
        base = "one seed per entry (no spread)" if n == 1 else f"mean ± std over {n} seeds"
        return base + ("; (n=k): an entry over k seeds" if len(ns) > 1 else "") + \
            "; group means and Average: spread of the per-seed values"

    def budget_note(self) -> str:
        """The legend of :data:`OFF_BUDGET` when an entry carries it."""
        return OFF_BUDGET_NOTE if any(c.off_budget for r in self.rows for c in r.cells.values()) else ""
