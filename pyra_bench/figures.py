"""Figures 2/4: accuracy against speed, one figure per backbone (``fig_<backbone>.png|pdf``).

Each compressing method (with its options and run tag) is one curve over its operating points, every point
labelled with its operating point and with error bars from seeds (the std of the per-seed Averages); the
backbone's uncompressed rows (PEFT) and those of its smaller backbone (PEFT*, ``BackboneSpec.smaller``)
are reference points. The x axis is the measured throughput when every point has one, else MACs per image
(axis reversed so that faster is to the right), labelled either way.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .table_model import Group

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h"]
LINESTYLES = ["-", "--", "-.", ":"]


def _smaller(backbone: str) -> str | None:
    from .models.backbones import BACKBONES

    return getattr(BACKBONES.get(backbone), "smaller", None) if backbone in BACKBONES else None


def figure_backbones(groups: list[Group]) -> list[str]:
    """The backbones that get a figure: those with compressed records on VTAB tasks."""
    return sorted({g.backbone for g in groups if g.vtab() and g.compressed})


def drawn(g: Group, methods: list[str] | None) -> bool:
    """Whether ``g``'s curve is drawn: ``methods`` None draws every one; else an entry names a method (its
    default options, any run tag) or a method key (one variant, e.g. ``pyra-wd_sigmoid``)."""
    return methods is None or g.method_key in methods or (g.method in methods and g.options == "{}")


def make_figure(groups: list[Group], backbone: str, metric_label: str = "", methods: list[str] | None = None):
    """The figure of one backbone (a :class:`matplotlib.figure.Figure`, made without pyplot), or None when
    neither throughput nor MACs are recorded for every point. ``methods``: the curves drawn (:func:`drawn`;
    the command's default is the paper's, ToMe and PYRA); PEFT and PEFT* are always reference points."""
    from matplotlib.figure import Figure

    from .table_model import STRATA, TASKS, backbone_display, method_display, setting_suffix

    def y_of(g: Group) -> tuple[float, float, bool]:
        c = g.mean_cell(STRATA)
        if not c.missing:
            return c.mean, (0.0 if math.isnan(c.std) else c.std), True
        vals = [g.cell(t).mean for t in TASKS if t in g.values]
        return (sum(vals) / len(vals) if vals else math.nan), 0.0, False

    vtab = [g for g in groups if g.vtab()]
    bb = backbone
    mine = [g for g in vtab if g.backbone == bb]
    small = _smaller(bb)
    refs = [g for g in vtab if not g.compressed and g.backbone in (bb, small)]
    curves: dict[tuple, list[Group]] = {}
    for g in mine:
        if g.compressed and drawn(g, methods):
            curves.setdefault((g.method, g.method_key, g.options, g.run_tag), []).append(g)
    points = [g for c in curves.values() for g in c] + refs
    use_tp = all(not math.isnan(g.mean_throughput) for g in points)
    use_macs = not use_tp and all(not math.isnan(g.mean_gmacs) for g in points)
    if not (use_tp or use_macs):
        print(f"[tables] figure for {bb}: skipped (neither throughput nor MACs recorded for every point)")
        return None
    x_attr = "mean_throughput" if use_tp else "mean_gmacs"

    def x_of(g: Group, attr: str = x_attr) -> float:
        return getattr(g, attr)

    def yerr(es: list[float]) -> list[float] | None:  # no bars at all without a spread (one seed)
        return es if any(e > 0 for e in es) else None

    complete = all(y_of(g)[2] for g in points)
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    styles = zip(itertools.cycle(MARKERS), itertools.cycle(LINESTYLES))
    for _, c in sorted(curves.items()):
        marker, ls = next(styles)
        c = sorted(c, key=x_of)
        xs, ys, es = [x_of(g) for g in c], [y_of(g)[0] for g in c], [y_of(g)[1] for g in c]
        ax.errorbar(xs, ys, yerr=yerr(es), marker=marker, linestyle=ls, capsize=3,
                    label=method_display(c[0]) + setting_suffix(c[0]))
        for g, x, y in zip(c, xs, ys):
            ax.annotate(g.schedule, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for g, marker in zip(sorted(refs, key=lambda g: (g.backbone != bb, g.key)), itertools.cycle(["*", "P", "X"])):
        x, (y, e, _) = x_of(g), y_of(g)
        name = f"{method_display(g)}{setting_suffix(g)} ({backbone_display(g.backbone, g.backbone_label)})"
        ax.errorbar([x], [y], yerr=yerr([e]), marker=marker, markersize=11, linestyle="none", capsize=3,
                    color="k" if g.backbone == bb else "0.5", label=name)
    ax.set_xlabel("throughput (img/s)" if use_tp else "GMACs per image (lower is faster)")
    ax.set_ylabel(("VTAB-1k Average top-1 (%)" if complete else "mean top-1 over the recorded tasks (%)")
                  + (f"\n{metric_label}" if metric_label else ""), fontsize=8 if metric_label else None)
    ax.set_title(backbone_display(bb, next((g.backbone_label for g in mine if g.backbone_label), None)))
    if not use_tp:
        ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def draw_figures(groups: list[Group], out: Path, metric_label: str = "", methods: list[str] | None = None
                 ) -> list[Path]:
    """One figure per backbone with compressed records of the chosen ``methods`` on VTAB tasks
    (:func:`make_figure`); returns the files written."""
    paths: list[Path] = []
    for bb in figure_backbones([g for g in groups if not g.compressed or drawn(g, methods)]):
        fig = make_figure(groups, bb, metric_label, methods)
        if fig is None:
            continue
        out.mkdir(parents=True, exist_ok=True)
        for ext in ("png", "pdf"):
            p = out / f"fig_{bb}.{ext}"
            fig.savefig(p, dpi=150)
            paths.append(p)
    return paths
