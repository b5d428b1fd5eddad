"""Tasks from config (a folder data set outside VTAB), the community's VTAB folder names, the PYRA lr recipe."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pyra_bench.data import DataNotFoundError, VTABDataModule, VTABFolderDataset, get_task
from pyra_bench.data.tasks import VTAB_TASKS, task_spec_from_config
from pyra_bench.errors import ConfigError
from pyra_bench.models import build_model
from pyra_bench.paths import CONF_DIR


def _write_folder(task_dir, lists: dict[str, list[int]], size: int = 16, seed: int = 0) -> None:
    """Noisy grey images, dark (label 0) or bright (label 1), one PNG each, and the split lists."""
    rng = np.random.default_rng(seed)
    (task_dir / "img").mkdir(parents=True)
    k = 0
    for list_name, labels in lists.items():
        lines = []
        for label in labels:
            img = rng.normal(70 if label == 0 else 180, 30, (size, size, 1)).repeat(3, axis=2)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB").save(task_dir / "img" / f"{k:04d}.png")
            lines.append(f"img/{k:04d}.png {label}")
            k += 1
        (task_dir / list_name).write_text("\n".join(lines) + "\n")


def _vtab_like(root, folder: str, splits=("train800val200", "test"), n=4):
    _write_folder(root / folder, {f"{s}.txt": [i % 2 for i in range(n)] for s in splits})


# -- the community's folder names ------------------------------------------------------------------------
def test_a_folder_named_cifar_is_found_for_cifar100(tmp_path):
    _vtab_like(tmp_path, "cifar")  # as in the NOAH / SSF / VPT VTAB-1k zips
    ds = VTABFolderDataset(tmp_path, "cifar100", "test")
    assert ds.task_dir == tmp_path / "cifar" and len(ds) == 4
    dm = VTABDataModule("cifar100", tmp_path, batch_size=2, num_workers=0, image_size=32)
    assert dm.describe()["sizes"] == {"train800val200": 4, "test": 4}
    _vtab_like(tmp_path, "cifar100", n=6)  # our own name wins when both exist
    assert VTABFolderDataset(tmp_path, "cifar100", "test").task_dir == tmp_path / "cifar100"


def test_a_folder_named_oxford_iiit_pet_is_found_for_oxford_pet(tmp_path):
    _vtab_like(tmp_path, "oxford_iiit_pet")
    assert VTABFolderDataset(tmp_path, "oxford_pet", "test").task_dir == tmp_path / "oxford_iiit_pet"


def test_missing_folder_error_names_the_aliases_it_looked_for(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"task folder not found: .*cifar100 \(also looked for .*/cifar: "
                                                r"the name the NOAH/SSF/VPT VTAB-1k archives use\)\n.*tasks=cifar100"):
        VTABFolderDataset(tmp_path, "cifar100", "test")
    with pytest.raises(DataNotFoundError, match=r"task folder not found: \S*dtd\n"):  # no alias: no "also"
        VTABFolderDataset(tmp_path, "dtd", "test")


# -- tasks from config -----------------------------------------------------------------------------------
STRIPES = {"name": "stripes", "num_classes": 2, "folder": "my_stripes", "display": "Stripes",
           "splits": {"train800val200": "train.txt", "test": "test.txt"}}


def test_task_from_config_spec():
    spec = task_spec_from_config(STRIPES)
    assert (spec.name, spec.num_classes, spec.group, spec.display, spec.source) == (
        "stripes", 2, "custom", "Stripes", "folder")
    assert spec.split_file("test") == "test.txt" and spec.split_file("val200") == "val200.txt"
    assert task_spec_from_config({"name": "cifar100", "source": "folder", "num_classes": 100}) is get_task("cifar100")
    example = task_spec_from_config(OmegaConf.load(CONF_DIR / "task" / "custom_folder_example.yaml"))
    assert example.source == "folder" and set(example.split_files) == {"train800val200", "test", "train800", "val200"}


@pytest.mark.parametrize("cfg,match", [
    ({"name": "stripes"}, "must give num_classes"),
    ({**STRIPES, "num_classes": 0}, "num_classes must be a positive int"),
    ({**STRIPES, "splits": {"training": "t.txt"}}, "unknown split.*training.*valid: train800"),
    ({**STRIPES, "clases": 2}, "unknown task config key.*clases"),
    ({"name": "cifar100", "num_classes": 10}, "task .cifar100. has 100 classes"),
])
def test_task_config_errors(cfg, match):
    with pytest.raises(ConfigError, match=match):
        task_spec_from_config(cfg)


def test_task_from_config_trains_through_the_datamodule(tmp_path):
    rng = np.random.default_rng(1)
    train, test = rng.integers(0, 2, 48).tolist(), rng.integers(0, 2, 24).tolist()
    _write_folder(tmp_path / "my_stripes", {"train.txt": train, "test.txt": test})
    spec = task_spec_from_config(STRIPES)
    dm = VTABDataModule(spec, tmp_path, batch_size=8, num_workers=0, image_size=32, seed=0)
    assert dm.num_classes == 2 and dm.describe()["group"] == "custom"
    with pytest.raises(DataNotFoundError, match=r"split list not found: .*train800.txt.*\n.*task.splits.train800"):
        VTABDataModule(spec, tmp_path, batch_size=8, num_workers=0, image_size=32, train_split="train800",
                       eval_split="val200")
    model = build_model("vit_tiny_test", dm.num_classes, "pyra", "low", lora_dropout=0.0, drop_path_rate=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def test_loss():
        model.eval()
        with torch.no_grad():
            return np.mean([torch.nn.functional.cross_entropy(model(x), y).item() for x, y in (dm.on_after_batch_transfer(b, 0) for b in dm.test_dataloader())])

    before = test_loss()
    for _ in range(6):
        model.train()
        for x, y in (dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader()):
            assert x.shape == (8, 3, 32, 32) and set(y.tolist()) <= {0, 1}
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert test_loss() < before - 0.1  # learnt something that carries to the test list


# -- the authors' per-task PYRA learning rates --------------------------------------------------------------
def test_every_vtab_task_config_carries_the_authors_pyra_lr():
    for task in VTAB_TASKS:
        lr = OmegaConf.load(CONF_DIR / "task" / f"{task}.yaml").pyra_lr
        assert set(lr) == {"low", "high"} and all(isinstance(v, float) and 0 < v < 1 for v in lr.values())
    # spot checks against research note pyra_reference.md section 5.3
    got = {t: dict(OmegaConf.load(CONF_DIR / "task" / f"{t}.yaml").pyra_lr) for t in ("cifar100", "svhn", "kitti")}
    assert got == {"cifar100": {"low": 1e-5, "high": 3e-6}, "svhn": {"low": 3e-2, "high": 1e-3},
                   "kitti": {"low": 3e-6, "high": 1e-4}}


@pytest.mark.parametrize("overrides,lr", [
    (["task=cifar100", "compression=high"], 3e-6),
    (["task=svhn", "budget=low"], 3e-2),
    (["task=svhn", "compression=flops:0.4"], None),  # no per-task value: trainer.lr
])
def test_recipe_sets_the_pyra_lr_of_the_task_and_compression(overrides, lr):
    from hydra import compose, initialize_config_dir

    import pyra_bench.train  # noqa: F401  (registers the config resolvers)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["method=pyra", *overrides, "+recipe=pyra_authors_lr"])
    assert cfg.method.lr == lr and cfg.method.weight_decay == 1e-3 and cfg.run_tag == "authors_pyra_lr"


def test_task_from_config_trains_and_is_recorded_in_its_own_group(tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from pyra_bench.train import train

    rng = np.random.default_rng(2)
    _write_folder(tmp_path / "data" / "custom_folder_example",
                  {"train.txt": rng.integers(0, 2, 40).tolist(), "test.txt": rng.integers(0, 2, 20).tolist()})
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "task=custom_folder_example", f"data_root={tmp_path}/data", "backbone=vit_tiny_test", "method=pyra",
            "compression=low", "trainer=smoke", "trainer.batch_size=8", f"results_dir={tmp_path}/results",
            f"run_dir={tmp_path}/run"])
    train(cfg)
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("*.json")]
    assert record["status"] == "completed" and record["task"] == "custom_folder_example"
    assert record["group"] == "custom" and record["metrics"]["test_images"] == 20
    # the tables title its column with the config's `display` (config-only tasks are in no task registry)
    from pyra_bench import tables

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        tcfg = compose("tables", overrides=[f"records={tmp_path}/results", f"out={tmp_path}/tables", "figures=false",
                                            "tables=[3]", "formats=[csv]"])
    tables.run(tcfg)
    columns = pd.read_csv(tmp_path / "tables" / "other_tasks_custom.csv").columns
    assert "Custom example" in columns and "custom_folder_example" not in columns
