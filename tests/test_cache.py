"""The input cache (pyra_bench.data.cache): cached batches, normalised on the device, are bit-identical to
the PIL path's; reuse, invalidation, the size limit, atomic writes and bad options."""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pyra_bench.data import (
    VTABDataModule,
    VTABFolderDataset,
    build_transform,
    get_normalization,
    write_digits_folder,
)
from pyra_bench.data.cache import CachedImages, ensure_cached
from pyra_bench.data.folder import CorruptImageError
from pyra_bench.data.transforms import Uint8Normalizer
from pyra_bench.errors import ConfigError


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    write_digits_folder(root)
    return root


def _photo_folder(root, n: int = 12):
    """A small folder in the VTAB layout (task ``digits``, 10 classes) with the images the real tasks have:
    256-px and non-square RGB JPEGs, a greyscale JPEG and an RGBA PNG, at sizes that do not divide 48."""
    rng = np.random.default_rng(0)
    task = root / "digits"
    (task / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        h, w = [(256, 256), (300, 200), (75, 101), (500, 375)][i % 4]
        smooth = Image.fromarray(rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)).resize((w, h))
        noisy = np.clip(np.asarray(smooth, dtype=np.int16) + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(noisy)
        if i % 5 == 3:
            name = f"{i:03d}.png"
            img.convert("RGBA").save(task / "images" / name)
        else:
            name = f"{i:03d}.jpg"
            (img.convert("L") if i % 5 == 1 else img).save(task / "images" / name, quality=90)
        lines.append(f"images/{name} {i % 10}")
    (task / "val200.txt").write_text("\n".join(lines) + "\n")
    return root


def _copy_val200(root, dst):
    """A writable copy of the digits folder's val200 split (the only split these tests read)."""
    (dst / "digits" / "images").mkdir(parents=True)
    shutil.copytree(root / "digits" / "images" / "val200", dst / "digits" / "images" / "val200")
    shutil.copy(root / "digits" / "val200.txt", dst / "digits")
    return dst


def _dm(root, tmp_path, **kw):
    base = dict(batch_size=4, eval_batch_size=5, num_workers=0, image_size=32, cache_dir=tmp_path / "cache",
                train_split="val200", eval_split="val200")
    return VTABDataModule("digits", root, **{**base, **kw})


def _batches(dm, loader="test"):
    dl = getattr(dm, f"{loader}_dataloader")()
    return [dm.on_after_batch_transfer(b, 0) for b in dl]


@pytest.mark.parametrize("which,image_size", [("digits", 32), ("photos", 48)])
def test_cached_batches_are_bit_identical_to_the_pil_path(digits_root, tmp_path, which, image_size):
    root = digits_root if which == "digits" else _photo_folder(tmp_path / "photos")
    cached = _dm(root, tmp_path, image_size=image_size)
    pil = _dm(root, tmp_path, image_size=image_size, cache=False)
    assert cached.cache and not pil.cache
    raw = next(iter(cached.test_dataloader()))[0]
    assert raw.dtype == torch.uint8 and raw.shape[1:] == (3, image_size, image_size)  # what the loader ships
    a, b = _batches(cached), _batches(pil)
    assert len(a) == len(b) and sum(len(y) for _, y in a) == len(pil._dataset("val200"))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.float32
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # and against torchvision directly, image by image
    ds = VTABFolderDataset(root, "digits", "val200")
    tf = build_transform(image_size, *get_normalization("imagenet"))
    for i in (0, 1, 3, len(ds) - 1):
        assert torch.equal(torch.cat([x for x, _ in a])[i], tf(ds.load_image(i)))


def test_table_normaliser_matches_torchvision_for_every_value():
    """The off-CPU path (a table look-up) and the CPU path give torchvision's result for all 256 values."""
    from torchvision import transforms as T

    x = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(1, 3, 16, 16)
    for name in ("imagenet", "inception"):
        norm = Uint8Normalizer.from_name(name)
        mean, std = get_normalization(name)
        ref = T.Normalize(list(mean), list(std))(T.ToTensor()(Image.fromarray(x[0].permute(1, 2, 0).numpy())))
        assert torch.equal(norm(x)[0], ref) and torch.equal(norm.by_table(x)[0], ref)
    f = torch.randn(2, 3, 4, 4)
    assert norm(f) is f  # float input passes through
    with pytest.raises(ValueError, match="uint8 images"):
        norm(torch.zeros(2, 4, 4, 4, dtype=torch.uint8))


def test_the_cache_is_reused_and_rebuilt_when_its_inputs_change(digits_root, tmp_path, monkeypatch, caplog):
    root = _copy_val200(digits_root, tmp_path / "data")
    decoded = []
    original = VTABFolderDataset.load_image
    monkeypatch.setattr(VTABFolderDataset, "load_image", lambda self, i: decoded.append(i) or original(self, i))
    with caplog.at_level(logging.INFO, logger="pyra_bench.data.cache"):
        first = _batches(_dm(root, tmp_path))
    assert len(decoded) == 200 and "built in" in caplog.text and "digits/val200, 200 images at 32x32" in caplog.text
    assert "0.001 GB" in caplog.text  # 200 * 3 * 32 * 32 bytes, reported
    decoded.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pyra_bench.data.cache"):
        dm = _dm(root, tmp_path)
        again = _batches(dm)
    assert decoded == [] and "reused" in caplog.text  # later passes read the cache only
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(first, again))
    info = dm.describe()["input_cache"]["val200"]
    assert info["images"] == 200 and info["bytes"] == os.path.getsize(info["path"]) and not info["built_now"]
    _batches(_dm(root, tmp_path, image_size=16))  # another image size: another entry
    assert len(decoded) == 200
    decoded.clear()
    img = root / "digits" / "images" / "val200" / "000003.jpg"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # an image changed on disk
    _batches(_dm(root, tmp_path))
    assert len(decoded) == 200
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3 and not list((tmp_path / "cache").glob(".*.building"))


def test_size_limit_evicts_the_least_recently_used_and_falls_back_to_jpeg(digits_root, tmp_path, caplog):
    one = 200 * 3 * 32 * 32 / 1e9  # GB of the val200 split at 32 px
    ds = VTABFolderDataset(digits_root, "digits", "val200")
    small = ensure_cached(ds, 16, cache_dir=tmp_path / "c", max_gb=1.1 * one)
    big = ensure_cached(ds, 32, cache_dir=tmp_path / "c", max_gb=1.1 * one)  # 16 px (1/4 of it) + 32 px > limit
    assert small.built and big.built and not small.path.exists() and big.path.exists()
    with caplog.at_level(logging.WARNING, logger="pyra_bench.data.cache"):
        dm = _dm(digits_root, tmp_path, cache_max_gb=0.5 * one)
        x, _ = next(iter(dm.test_dataloader()))
    assert x.dtype == torch.float32  # not cached: the JPEG path, normalised in the loader as before
    assert "over the limit" in caplog.text and "cache_max_gb" in caplog.text
    assert dm.describe()["input_cache"]["val200"] is None


def test_a_failed_build_leaves_nothing_behind(digits_root, tmp_path):
    root = _copy_val200(digits_root, tmp_path / "data")
    (root / "digits" / "images" / "val200" / "000011.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(CorruptImageError, match="000011.jpg"):
        ensure_cached(VTABFolderDataset(root, "digits", "val200"), 32, cache_dir=tmp_path / "c", workers=2)
    assert not list((tmp_path / "c").glob("*.npy*")) and not list((tmp_path / "c").glob(".*.building"))


def test_cached_split_works_in_loader_workers(digits_root, tmp_path):
    dm = _dm(digits_root, tmp_path, num_workers=1)
    ds = dm._serve("val200")
    assert isinstance(ds, CachedImages) and ds.targets == VTABFolderDataset(digits_root, "digits", "val200").targets
    assert sum(len(y) for _, y in dm.test_dataloader()) == 200  # the memory map reopens in the worker


def test_bad_cache_options(digits_root, tmp_path):
    with pytest.raises(ConfigError, match="cache_max_gb must be positive"):
        _dm(digits_root, tmp_path, cache_max_gb=0)
    with pytest.raises(ConfigError, match="cache must be true, false or null"):
        _dm(digits_root, tmp_path, cache="yes")
    emb = VTABDataModule("digits", None, source="embedded", image_size=32, cache=True)
    assert not emb.cache  # in-memory data needs no cache


def test_lightning_normalises_cached_batches_on_the_device(digits_root, tmp_path):
    """Through Lightning's fit/validate, the module's steps see normalised float batches (the datamodule's
    on_after_batch_transfer), equal to the PIL path's."""
    import lightning as L

    seen = []

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, i):
            seen.append(batch[0])
            return (self.w * batch[0].mean()).sum()

        def validation_step(self, batch, i):
            seen.append(batch[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = _dm(digits_root, tmp_path, seed=3)
    trainer = L.Trainer(max_steps=1, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu")
    probe = Probe()
    trainer.fit(probe, datamodule=dm)
    trainer.validate(probe, datamodule=dm, verbose=False)
    pil = _dm(digits_root, tmp_path, cache=False, seed=3)
    assert all(x.dtype == torch.float32 for x in seen) and len(seen) == 2
    assert torch.equal(seen[0], next(iter(pil.train_dataloader()))[0])
    assert torch.equal(seen[1], next(iter(pil.val_dataloader()))[0])


def test_bench_data_script_reports_the_ratio(tmp_path, capsys):
    """scripts/bench_data.py end to end (timings are reported, never asserted)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import bench_data

    rep = bench_data.main(["--make-photos", str(tmp_path / "p"), "--data-root", str(tmp_path / "p"), "--task", "dtd",
                           "--count", "12", "--photo-size", "64", "--image-size", "32", "--seconds", "0.05",
                           "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("cached/jpeg: ") and out[-1].endswith("x")
    assert float(out[-1].split()[1][:-1]) == pytest.approx(rep["cached_over_jpeg"], rel=0.01)
    assert rep["images"] == 12 and rep["cache_bytes"] >= 12 * 3 * 32 * 32
    assert set(rep["paths"]) == {"jpeg", "first pass (build)", "cached", "cached + CPU normalise"}
    assert rep["paths"]["cached"]["dtype"] == "uint8" and rep["paths"]["jpeg"]["dtype"] == "float32"
    assert len(list((tmp_path / "out").glob("data_cpu-*_dtd.md"))) == 1
