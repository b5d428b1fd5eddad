"""``python -m pyra_bench.visualize``: on a run of the demo's shape (digits, the demo backbone, PYRA) it
writes a PNG per image and the CSVs, exit 0 (a subprocess, as a user types it); it works on a VTAB-1k
folder task; bad input (a run folder without an exported model, a file that is not an image, a block out
of range) is one message, exit status 2, nothing written."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest
import torch
from helpers.cli import run_entry_point
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")


def export_run(run_dir: Path, *overrides: str) -> Path:
    """A run folder holding an exported inference model of the given train config (untrained: the
    backbone is randomly initialised, so nothing is downloaded or pre-trained)."""
    from pyra_bench.export import save_inference_model
    from pyra_bench.factory import make_model

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["backbone.weights=none", f"run_dir={run_dir}", *overrides])
    torch.manual_seed(0)
    model = make_model(cfg, int(cfg.task.num_classes), pretrained=False, checkpoint=None)
    m = model.pyra_method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for st in m.stages():
            m.on_stage_start(st, model, None)
    save_inference_model(run_dir, m.inference_model(model), m, cfg)
    return run_dir


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The demo's run (python -m pyra_bench.train with no arguments: digits, vit_demo_mnist, PYRA low)."""
    return export_run(tmp_path_factory.mktemp("demo") / "run")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_visualize_on_a_vtab_folder_task(tmp_path):
    """A run whose task is a VTAB-1k folder: images of a split are read from the folder; two runs (PYRA,
    SPViT) in one call give one line each and each run's pictures in its own sub-folder."""
    import numpy as np
    from PIL import Image

    from pyra_bench.visualize import run

    folder = tmp_path / "vtab" / "custom_folder_example"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / "images" / f"{i}.png")
    (folder / "val.txt").write_text("images/0.png 1\nimages/1.png 3\n")
    common = ["task=custom_folder_example", f"data_root={tmp_path}/vtab", "backbone=vit_tiny_test"]
    a = export_run(tmp_path / "runs" / "pyra", "method=pyra", "compression=low", *common)
    b = export_run(tmp_path / "runs" / "spvit", "method=spvit", "compression=flops:0.7", *common)
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("visualize", overrides=[f"run=[{a},{b}]", "images=val200", "num_images=1",
                                              f"out={tmp_path}/pictures"])
    run(cfg)
    out = tmp_path / "pictures"
    assert (out / "pyra" / "val200_0000.png").is_file() and (out / "spvit" / "val200_0000.png").is_file()
    rows = _rows(out / "tokens_per_block.csv")
    assert {r["run"] for r in rows} == {"pyra", "spvit"} and len(rows) == 2 * 3
    spvit = [r for r in rows if r["run"] == "spvit"]
    assert float(spvit[-1]["fused_patches"]) > 0 and float(spvit[-1]["patches_kept"]) == 16
    # image files instead of a split (names from the files), out defaulting to the run folder
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("visualize", overrides=[f"run={a}", f"images=[{folder}/images/*.png]", "blocks=[1]"])
    run(cfg)
    assert sorted(p.name for p in (a / "visualize").glob("*.png")) == ["0.png", "1.png", "tokens_per_block.png"]


def _main():
    from pyra_bench.visualize import main

    return main


@pytest.mark.parametrize("case", ["no-model", "not-an-image", "block-out-of-range"])
def test_bad_input_is_one_message_exit_2_nothing_written(case, demo_run, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (tmp_path / "notes.png").write_text("not an image\n")
    args, fragment, folder = {
        "no-model": ([f"run={empty}"], f"run={empty}: no exported inference model at {empty}", empty),
        "not-an-image": ([f"run={demo_run}", f"images=[{tmp_path}/notes.png]"],
                         f"images={tmp_path}/notes.png: not an image PIL can read", demo_run),
        "block-out-of-range": ([f"run={demo_run}", "blocks=[1,4]"],
                               "blocks=[1, 4]: block 4 is out of range; valid: block indices 0..3 (the model has 4 "
                               "blocks)", demo_run),
    }[case]
    before = sorted(p.name for p in folder.iterdir())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    code, out, err = run_entry_point(_main(), "pyra_bench/visualize.py", args, cwd, monkeypatch, capsys,
                                     env={"HYDRA_FULL_ERROR": "0"})
    assert code == 2, out + err
    assert fragment in err and "error:" in err and "Traceback" not in out + err, err
    assert len(err.strip().splitlines()) == 1, "one message"
    assert sorted(p.name for p in folder.iterdir()) == before, "nothing written in the run folder"
    assert not list(cwd.iterdir()), "nor in the working folder"
