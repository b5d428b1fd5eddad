"""``python -m pyra_bench.visualize``: what a run's token merging / pruning keeps, merges and drops on images.

    python -m pyra_bench.visualize run=outputs/runs/<run_id>                  (conf/visualize.yaml)
    python -m pyra_bench.visualize run=<run_dir> images=val200 'blocks=[0,3]' out=pictures
    python -m pyra_bench.visualize 'run=[<run_a>,<run_b>]' out=compare        (one line per run in the plot)

The run's exported inference model (:mod:`pyra_bench.export`) is traced on each image
(:func:`pyra_bench.models.merging.trace_sources`). Written to ``out`` (default ``<run_dir>/visualize``):

* ``<image>.png`` per image: the input, then one panel per chosen block and the final groups, in the
  ToMe paper's style (each merged group filled with its mean colour and outlined in a colour of its own),
  dropped patches grey, patches in a fused (package) token hatched; for PYRA a second row with each
  block's per-token modulation strength (the mean over channels of the gate) as a heat map.
* ``tokens_per_block.csv`` (tokens, kept patches and groups after each block, averaged over the images)
  and ``group_sizes.csv`` (the group-size histogram after the last block), and ``tokens_per_block.png``:
  tokens vs block, one line per run.

Several runs (a list or a glob) share one ``out`` (required then); each run's pictures go to
``<out>/<run folder name>/``. Every input is checked before anything is written (exit status 2).
"""

from __future__ import annotations

import colorsys
import csv
import glob
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from . import paths
from .errors import ConfigError, InputError, InputFileNotFoundError, exit_on_input_error

PROG = "python -m pyra_bench.visualize"
PANEL_PX = 224  # a panel's side in pixels (the image is scaled up by a whole factor to about this)
DROPPED = (0.55, 0.55, 0.55)


@dataclass
class Run:
    """One run to draw: its folder name, the loaded inference model and what the tables call it."""

    path: Path
    name: str
    model: Any
    label: str
    blocks: list[int] = field(default_factory=list)


@dataclass
class Options:
    runs: list[Run]
    images: list[tuple[str, torch.Tensor, np.ndarray]]  # (name, model input (3, S, S), display RGB (S, S, 3))
    out: Path


# ---------------------------------------------------------------------------------------------------------
# Checking the inputs (nothing is written)
# ---------------------------------------------------------------------------------------------------------
def _as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v, resolve=True)
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _run_paths(spec: Any) -> list[Path]:
    entries = [str(s) for s in _as_list(spec)]
    if not entries:
        raise ConfigError("run= is missing: give a run folder (<runs_root>/<run_id>, with inference_model.json and "
                          ".safetensors), e.g. run=outputs/runs/<run_id>")
    out: list[Path] = []
    for e in entries:
        hits = sorted(glob.glob(e)) if any(c in e for c in "*?[") else [e]
        if not hits:
            raise InputFileNotFoundError(f"run={e}: no run folder matches")
        out += [Path(h) for h in hits]
    return out


def _load_run(path: Path) -> Run:
    from .export import load_inference_model
    from .methods import METHODS

    try:
        model = load_inference_model(path)
    except InputError as e:
        raise type(e)(f"run={path}: {e}") from None
    rc = model.pyra_config
    method = rc["method"]["name"]
    label = METHODS.get(method).label() if method in METHODS else method
    comp = rc.get("compression")
    label += f" {comp}" if isinstance(comp, str) else f" {list(comp)}" if comp is not None else ""
    folder = path if path.is_dir() else path.parent
    return Run(folder, folder.name, model, label)


def _blocks(spec: Any, depth: int, where: str) -> list[int]:
    """Indices of the chosen blocks, each in [0, depth)."""
    if spec is None:
        return list(range(depth))
    vals = _as_list(spec)
    valid = f"block indices 0..{depth - 1} (the model has {depth} blocks), e.g. blocks=[0,{depth - 1}]"
    bad = [v for v in vals if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < depth]
    if bad or not vals:
        raise ConfigError(f"blocks={vals}: {'block ' + repr(bad[0]) + ' is out of range' if bad else 'empty'}"
                          f"{' for ' + where if where else ''}; valid: {valid}, or blocks=null for all")
    return sorted(set(vals))


def _load_file(path: Path, image_size: int, normalization: str):
    from PIL import Image

    from .data.folder import open_image, to_rgb
    from .data.transforms import build_transform

    if not path.is_file():
        raise InputFileNotFoundError(f"images={path}: no such file; give image files, or a split name "
                                     "(train800, val200, train800val200, test)")
    try:
        with open_image(path) as img:
            rgb = to_rgb(img, path)
    except InputError as e:
        raise type(e)(f"images={path}: {e}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ConfigError(f"images={path}: not an image PIL can read ({e}); give image files (PNG, JPEG, ...) or "
                          "a split name (train800, val200, train800val200, test)") from None
    return build_transform(image_size, normalization=normalization)(rgb)


def _split_images(cfg: dict[str, Any], split: str, n: int, data_root: Any):
    """The first ``n`` images of ``split`` of the run's task, as the model sees them."""
    from .data.embedded import digits_dataset
    from .data.folder import VTABFolderDataset
    from .data.tasks import task_spec_from_config
    from .data.transforms import build_transform

    b, task = cfg["backbone"], cfg["task"]
    if task.get("source") == "embedded":
        ds = digits_dataset(split, int(b["image_size"]), b["normalization"])
    else:
        root = data_root or cfg.get("data_root")
        tf = build_transform(int(b["image_size"]), normalization=b["normalization"])
        ds = VTABFolderDataset(root, task_spec_from_config(task), split, tf)
    return [(f"{split}_{i:04d}", ds[i][0]) for i in range(min(n, len(ds)))]


def _display(x: torch.Tensor, normalization: str) -> np.ndarray:
    """The model input (3, S, S) back in [0, 1] RGB (S, S, 3)."""
    from .data.transforms import get_normalization

    mean, std = get_normalization(normalization)
    img = x.float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return img.clamp(0, 1).permute(1, 2, 0).numpy()


def check_options(cfg: DictConfig) -> Options:
    """Every input, checked (and loaded) before anything is written; :class:`InputError` otherwise."""
    from . import schema
    from .data.tasks import SPLITS

    schema.check(cfg, schema.Visualize, "visualize config")
    n = cfg.get("num_images", 8)
    runs = [_load_run(p) for p in _run_paths(cfg.get("run"))]
    for r in runs:
        r.blocks = _blocks(cfg.get("blocks"), len(r.model.blocks), f"run {r.name}" if len(runs) > 1 else "")
    first = runs[0].model.pyra_config
    inputs = {(int(r.model.pyra_config["backbone"]["image_size"]), str(r.model.pyra_config["backbone"]["normalization"]))
              for r in runs}
    if len(inputs) > 1:
        raise ConfigError(f"run=: the runs take different inputs (image size, normalization: {sorted(inputs)}); "
                          "draw them separately")
    (size, norm), = inputs
    spec = _as_list(cfg.get("images"))
    if len(spec) == 1 and str(spec[0]) in SPLITS:
        loaded = _split_images(first, str(spec[0]), int(n), cfg.get("data_root"))
    elif not spec:
        raise ConfigError(f"images= is empty; give a split ({', '.join(SPLITS)}) or image files")
    else:
        files = [Path(h) for s in spec for h in (sorted(glob.glob(str(s))) if any(c in str(s) for c in "*?[")
                                                  else [str(s)])]
        if not files:
            raise InputFileNotFoundError(f"images={spec}: no file matches; give image files or a split name "
                                         f"({', '.join(SPLITS)})")
        names = [f.stem if [g.stem for g in files].count(f.stem) == 1 else f"{f.stem}_{i}" for i, f in enumerate(files)]
        loaded = [(name, _load_file(f, size, norm)) for name, f in zip(names, files)]
    images = [(name, x, _display(x, norm)) for name, x in loaded]
    out = cfg.get("out")
    if out is None:
        if len(runs) > 1:
            raise ConfigError(f"out= is needed for several runs ({len(runs)}); e.g. out=visualize_compare")
        out = runs[0].path / "visualize"
    schema.check({"out": str(out)}, schema.OutputFolder, "visualize config")
    return Options(runs, images, Path(str(out)))


# ---------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------
def group_colour(i: int) -> tuple[float, float, float]:
    """A bright colour per group index, spread by the golden ratio (fixed: a picture is reproducible)."""
    return colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 0.95)


def group_panel(image: np.ndarray, groups: np.ndarray, fused: np.ndarray, grid: tuple[int, int],
                scale: int) -> np.ndarray:
    """ToMe's picture of one block: each group filled with its mean colour and outlined in its own colour,
    dropped patches grey, fused patches hatched. ``groups``/``fused``: per patch (P,), row-major grid."""
    gh, gw = grid
    H, W, _ = image.shape
    ph, pw = H // gh, W // gw
    big = np.kron(image, np.ones((scale, scale, 1)))
    ids = np.kron(groups.reshape(gh, gw), np.ones((ph * scale, pw * scale), dtype=np.int64))
    fz = np.kron(fused.reshape(gh, gw), np.ones((ph * scale, pw * scale), dtype=bool))
    out = np.empty_like(big)
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[[0, -1]] = edge[:, [0, -1]] = True
    for g in np.unique(ids):
        mask = ids == g
        if g < 0:
            out[mask] = DROPPED
            continue
        out[mask] = big[mask].mean(axis=0)
        out[mask & edge] = group_colour(int(g))
    yy, xx = np.indices(ids.shape)
    hatch = fz & ((yy + xx) % 6 < 2) & ~edge
    out[hatch] = 0.85 * out[hatch] + 0.15
    out[(ids < 0) & edge] = 0.4
    return out


def draw_image(run: Run, trace, b: int, image: np.ndarray, title: str):
    """The figure of one image (a :class:`matplotlib.figure.Figure`, made without pyplot)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    model = run.model
    grid = tuple(model.patch_embed.grid_size)
    scale = max(1, round(PANEL_PX / image.shape[0]))
    last = len(model.blocks) - 1
    shown = run.blocks + ([last] if last not in run.blocks else [])
    mod = [i for i in shown if trace.blocks[i].modulation is not None]
    rows = 2 if mod else 1
    fig = Figure(figsize=(1.9 * (len(shown) + 1), 2.1 * rows + 0.3))
    axes = fig.subplots(rows, len(shown) + 1, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    axes[0, 0].imshow(np.kron(image, np.ones((scale, scale, 1))), interpolation="nearest")
    axes[0, 0].set_title("input", fontsize=8)
    P = grid[0] * grid[1]
    for j, i in enumerate(shown, start=1):
        blk = trace.blocks[i]
        g, f = blk.groups[b].cpu().numpy(), blk.fused[b].cpu().numpy()
        axes[0, j].imshow(group_panel(image, g, f, grid, scale), interpolation="nearest")
        dropped, fused = int((g < 0).sum()), int(f.sum())
        extra = (f", {dropped} dropped" if dropped else "") + (f", {fused} fused" if fused else "")
        name = "final" if i == last else f"block {i}"
        axes[0, j].set_title(f"{name}: {blk.tokens} tokens\n{len(set(g[g >= 0].tolist()))} groups of {P}{extra}",
                             fontsize=7)
        if i in mod:
            s = blk.modulation[b].cpu().numpy().reshape(grid)
            vmax = max(float(np.nanmax(np.abs(s))) if np.isfinite(s).any() else 0.0, 0.01)
            cmap = colormaps["coolwarm"].with_extremes(bad="0.3")
            im = axes[1, j].imshow(np.ma.masked_invalid(s), cmap=cmap, vmin=-vmax, vmax=vmax, interpolation="nearest")
            axes[1, j].set_title(f"block {i}: modulation", fontsize=7)
            fig.colorbar(im, ax=axes[1, j], fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    if mod:
        axes[1, 0].text(0.0, 0.5, "PYRA: mean gate of\neach merged source\n(dark: not merged\nin that block)",
                        fontsize=7, va="center")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig


def tokens_plot(rows: list[dict[str, Any]]):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for label in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == label]
        ax.plot([r["block"] for r in mine], [r["tokens"] for r in mine], marker="o", label=mine[0]["label"])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel("tokens after the block")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def _write_figure(fig, path: Path) -> Path:
    from .fileio import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(path, buf.getvalue())


def _write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    from .fileio import atomic_write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def trace_run(run: Run, x: torch.Tensor):
    from .models.merging import trace_sources

    with torch.no_grad(), trace_sources(run.model) as trace:
        run.model(x)
    return trace


def per_block_rows(run: Run, trace) -> list[dict[str, Any]]:
    rows = []
    for i, blk in enumerate(trace.blocks):
        kept = (blk.groups >= 0).sum(dim=1).float()
        groups = [len(torch.unique(g[g >= 0])) for g in blk.groups]
        rows.append({"run": run.name, "label": run.label, "block": i, "tokens": blk.tokens,
                     "patches_kept": round(float(kept.mean()), 2),
                     "groups": round(sum(groups) / len(groups), 2),
                     "fused_patches": round(float(blk.fused.sum(dim=1).float().mean()), 2)})
    return rows


def group_size_rows(run: Run, trace) -> list[dict[str, Any]]:
    g = trace.blocks[-1].groups
    sizes = torch.cat([torch.bincount(row[row >= 0])[torch.bincount(row[row >= 0]) > 0] for row in g])
    hist = torch.bincount(sizes)
    return [{"run": run.name, "label": run.label, "group_size": s, "groups": int(c)}
            for s, c in enumerate(hist.tolist()) if c]


def build(o: Options) -> list[Path]:
    """Everything ``python -m pyra_bench.visualize`` writes, for checked options; returns the files."""
    from .fileio import make_dir

    x = torch.stack([img for _, img, _ in o.images])
    written: list[Path] = []
    block_rows: list[dict[str, Any]] = []
    size_rows: list[dict[str, Any]] = []
    for run in o.runs:
        trace = trace_run(run, x)
        folder = make_dir(o.out / run.name if len(o.runs) > 1 else o.out, "visualize output folder")
        for b, (name, _, disp) in enumerate(o.images):
            fig = draw_image(run, trace, b, disp, f"{run.label}  ({run.name}) -- {name}")
            written.append(_write_figure(fig, folder / f"{name}.png"))
        block_rows += per_block_rows(run, trace)
        size_rows += group_size_rows(run, trace)
    make_dir(o.out, "visualize output folder")
    written.append(_write_csv(block_rows, o.out / "tokens_per_block.csv"))
    written.append(_write_csv(size_rows, o.out / "group_sizes.csv"))
    written.append(_write_figure(tokens_plot(block_rows), o.out / "tokens_per_block.png"))
    return written


def run(cfg: Any) -> list[Path]:
    """Check, then draw (what the Hydra entry point calls; tests call it with a composed config)."""
    written = build(check_options(cfg))
    n = sum(p.suffix == ".png" for p in written) - 1
    print(f"[visualize] {n} image(s), tokens_per_block.csv|png, group_sizes.csv -> {written[-1].parent}")
    return written


@hydra.main(version_base="1.3", config_path=str(paths.CONF_DIR), config_name="visualize")
def main(cfg: DictConfig) -> None:
    """``python -m pyra_bench.visualize run=<run_dir> [key=value ...]``: see ``conf/visualize.yaml``."""
    try:
        run(cfg)
    except InputError as e:
        exit_on_input_error(e, PROG)


if __name__ == "__main__":
    main()
