"""LaTeX for the tables: booktabs rules, right-aligned numbers, the best entry of a block in bold and the
second best underlined (as the paper marks them), ``table*`` for the per-task tables, and a width that fits
(``\\resizebox`` down to the line width, never up). Each file is a float to ``\\input`` into a paper that
loads ``booktabs``, ``graphicx`` and ``amsmath``; ``tables.tex`` is a document that inputs them all.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from .table_model import Table

PREAMBLE = r"\usepackage{booktabs,graphicx,amsmath,longtable}"
_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
            "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
            "−": "$-$", "—": "--", "±": r"$\pm$", "σ": r"$\sigma$", "·": r"$\cdot$", "×": r"$\times$",
            "†": r"$^\dagger$", "‡": r"$^\ddagger$", "→": r"$\rightarrow$"}
_SPECIAL_RE = re.compile("|".join(re.escape(k) for k in _SPECIAL))
# Fit the width: shrink to the line width when wider, keep the natural size otherwise.
_FIT = r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%"


def escape(s: object) -> str:
    """Plain text -> LaTeX (special characters and the few Unicode symbols the tables use)."""
    return _SPECIAL_RE.sub(lambda m: _SPECIAL[m.group(0)], str(s))


def _cell(mean: float, std: float, n: int, dec: int, usual_n: int, mark: str | None, off_budget: bool = False) -> str:
    if math.isnan(mean):
        return "--"
    s = f"{mean:.{dec}f}"
    if not math.isnan(std):
        s += rf"{{\scriptsize$\pm${std:.{dec}f}}}"
    if n != usual_n:
        s += rf"$^{{n={n}}}$"
    s = {"best": rf"\textbf{{{s}}}", "second": rf"\underline{{{s}}}"}.get(mark or "", s)
    return s + (r"$^\ddagger$" if off_budget else "")  # the searched schedule missed its budget (table_model.OFF_BUDGET)


def _caption(title: str) -> str:
    """LaTeX numbers its own tables: "Table 6 (...)" becomes "As the paper's Table 6 (...)"."""
    return re.sub(r"^Table (\d+)", r"As the paper's Table \1", title)


def _float(env: str, title: str, label: str, colspec: str, body: list[str], notes: Sequence[str]) -> str:
    lines = [f"% {title} -- needs {PREAMBLE}", rf"\begin{{{env}}}[t]", r"\centering",
             rf"\caption{{{escape(_caption(title))}}}", rf"\label{{tab:{label}}}", _FIT,
             rf"\begin{{tabular}}{{{colspec}}}", r"\toprule", *body, r"\bottomrule", r"\end{tabular}}"]
    if notes:
        lines.append(r"\par\smallskip{\footnotesize " + r" \quad ".join(escape(n) for n in notes) + "}")
    lines.append(rf"\end{{{env}}}")
    return "\n".join(lines) + "\n"


def table_to_latex(t: Table) -> str:
    """One of the paper's tables (or an extra one): a block header row per block, rules between blocks."""
    usual = t.usual_n()
    rotate = len(t.value_cols) > 8
    head = ["Method", *(escape(c) for c in t.text_cols),
            *((rf"\rotatebox{{90}}{{{escape(lab)}}}" if rotate else escape(lab)) for _, lab, _ in t.value_cols)]
    ncol = len(head)
    body = [" & ".join(head) + r" \\", r"\midrule"]
    blocks = list(dict.fromkeys(r.block for r in t.rows))
    for i, block in enumerate(blocks):
        if i:
            body.append(r"\midrule")
        if block:
            body.append(rf"\multicolumn{{{ncol}}}{{l}}{{\textit{{{escape(block)}}}}} \\")
        for r in (r for r in t.rows if r.block == block):
            cells = [r.label_tex, *(escape(r.text.get(c, "")) for c in t.text_cols),
                     *(_cell(r.cells[k].mean, r.cells[k].std, r.cells[k].n, dec, usual, r.marks.get(k),
                             r.cells[k].off_budget) for k, _, dec in t.value_cols)]
            body.append(" & ".join(cells) + r" \\")
    notes = [x for x in [t.seed_note(), "bold: best, underlined: second best within a block", *t.notes,
                         t.budget_note()] if x]
    return _float("table*" if t.wide else "table", t.title, t.name, "l" + "r" * (ncol - 1), body, notes)


LONG = 40  # rows from which a frame becomes a longtable (split across pages) rather than a float


def frame_to_latex(df: pd.DataFrame, title: str, label: str, decimals: int = 2) -> str:
    """A plain frame (vs-paper, paired comparisons): text left, numbers right, NaN as "--"; a longtable
    (``longtable`` package) when it has more than :data:`LONG` rows."""
    numeric = [pd.api.types.is_numeric_dtype(df[c]) for c in df.columns]

    def fmt(v: object, is_num: bool) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "--"
        if is_num and isinstance(v, float):
            return f"{v:.{decimals}f}"
        return escape(v)

    head = " & ".join(escape(c) for c in df.columns) + r" \\"
    rows = [" & ".join(fmt(v, n) for v, n in zip(row, numeric)) + r" \\" for row in df.itertuples(index=False)]
    colspec = "".join("r" if n else "l" for n in numeric) or "l"
    if len(rows) > LONG:
        return "\n".join([f"% {title} -- needs {PREAMBLE}", r"{\footnotesize", rf"\begin{{longtable}}{{{colspec}}}",
                          rf"\caption{{{escape(_caption(title))}}}\label{{tab:{label}}} \\", r"\toprule", head, r"\midrule",
                          r"\endhead", r"\bottomrule", r"\endfoot", *rows, r"\end{longtable}}"]) + "\n"
    body = [head, r"\midrule", *rows]
    return _float("table*" if len(df.columns) > 8 else "table", title, label, colspec, body, [])


def latex_document(names: Sequence[str]) -> str:
    """A document that inputs the given table files (``pdflatex tables.tex`` in the output folder)."""
    lines = [r"\documentclass{article}", r"\usepackage[margin=1.5cm,landscape]{geometry}",
             r"\usepackage[T1]{fontenc}", PREAMBLE, r"\begin{document}"]
    for name in names:
        lines += [rf"\input{{{name}}}", r"\clearpage"]
    return "\n".join([*lines, r"\end{document}"]) + "\n"
