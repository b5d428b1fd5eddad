"""The VTAB-1k folder dataset, transforms and the DataModule, on real images (the digits task as a folder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pyra_bench.data import (
    CorruptImageError,
    DataNotFoundError,
    LabelOutOfRangeError,
    SplitFormatError,
    VTABDataModule,
    VTABFolderDataset,
    build_transform,
    digits_arrays,
    digits_split_indices,
    get_normalization,
    verify_images,
    write_digits_folder,
)
from pyra_bench.registry import UnknownChoiceError

SPLITS = ("train800", "val200", "train800val200", "test")


@pytest.fixture(scope="module")
def jpg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab")
    write_digits_folder(root)  # JPEG quality 75, like the VTAB export
    return root


@pytest.fixture(scope="module")
def png_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vtab_png")
    write_digits_folder(root, image_format="png")
    return root


def _grey(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("split", SPLITS)
def test_png_folder_round_trips_exactly(png_root, split):
    images, labels = digits_arrays()
    idx = digits_split_indices(split)
    ds = VTABFolderDataset(png_root, "digits", split)
    assert len(ds) == len(idx) == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}[split]
    assert ds.targets == labels[idx].tolist()
    for j in (0, 1, len(ds) // 2, len(ds) - 1):
        img, label = ds[j]
        assert img.mode == "RGB" and img.size == (8, 8) and label == labels[idx[j]]
        rgb = _grey(img)
        assert (rgb == images[idx[j]][:, :, None]).all()  # lossless: identical pixels, grey in all channels


def test_jpeg_folder_matches_sklearn_within_jpeg_error(jpg_root):
    images, labels = digits_arrays()
    idx = digits_split_indices("test")
    ds = VTABFolderDataset(jpg_root, "digits", "test")
    assert ds.targets == labels[idx].tolist()
    assert all(str(p).endswith(".jpg") for p, _ in ds.samples)
    err = np.stack([np.abs(_grey(ds[j][0])[:, :, 0] - images[idx[j]]) for j in range(0, len(ds), 7)])
    assert err.mean() < 12 and np.median(err) < 10  # q75 JPEG of 8x8 images: close, not exact
    # sanity: a *wrong* image is far
    assert np.abs(_grey(ds[0][0])[:, :, 0] - images[idx[1]]).mean() > 20


def test_split_lists_are_relative_and_union_is_train_plus_val(jpg_root):
    task = jpg_root / "digits"
    lines = {s: (task / f"{s}.txt").read_text().splitlines() for s in SPLITS}
    assert lines["train800"][0] == f"images/train800/000000.jpg {digits_arrays()[1][digits_split_indices('train800')[0]]}"
    tv = VTABFolderDataset(jpg_root, "digits", "train800val200")
    parts = VTABFolderDataset(jpg_root, "digits", "train800").samples + VTABFolderDataset(
        jpg_root, "digits", "val200").samples
    assert [lab for _, lab in tv.samples] == [lab for _, lab in parts]
    assert all(a.read_bytes() == b.read_bytes() for (a, _), (b, _) in zip(tv.samples, parts))


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: all raised at construction (or, for undecodable images, when read / verified)
# ---------------------------------------------------------------------------------------------------------
def test_missing_root_names_the_prepare_command(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as e:
        VTABFolderDataset(root, "cifar100", "test")
    assert f"python -m pyra_bench.data.prepare --tasks cifar100 --data-root {root}" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)


def test_missing_task_folder_names_the_prepare_command(jpg_root):
    with pytest.raises(DataNotFoundError, match=r"task folder not found.*\n.*--tasks dtd --data-root"):
        VTABFolderDataset(jpg_root, "dtd", "train800")


def test_unknown_task_and_split(jpg_root):
    with pytest.raises(UnknownChoiceError, match="valid choices"):
        VTABFolderDataset(jpg_root, "digitz", "test")
    with pytest.raises(ValueError, match="unknown split 'train'.*train800val200"):
        VTABFolderDataset(jpg_root, "digits", "train")


def _copy_task(src_root, dst_root):
    import shutil

    shutil.copytree(src_root / "digits", dst_root / "digits")
    return dst_root / "digits"


def test_missing_split_file(jpg_root, tmp_path):
    task = _copy_task(jpg_root, tmp_path)
    (task / "val200.txt").unlink()
    with pytest.raises(DataNotFoundError, match=r"split list not found: .*val200.txt.*\n.*--overwrite"):
        VTABFolderDataset(tmp_path, "digits", "val200")
    VTABFolderDataset(tmp_path, "digits", "test")  # the other splits still load


def test_label_out_of_range_is_caught_before_training(jpg_root, tmp_path):
    task = _copy_task(jpg_root, tmp_path)
    lines = (task / "test.txt").read_text().splitlines()
    lines[5] = lines[5].rsplit(" ", 1)[0] + " 10"  # digits has classes 0..9
    (task / "test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(LabelOutOfRangeError, match=r"test.txt:6: label 10 is outside \[0, 10\)"):
        VTABFolderDataset(tmp_path, "digits", "test")
    lines[5] = lines[5].rsplit(" ", 1)[0] + " -1"
    (task / "test.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(LabelOutOfRangeError):
        VTABFolderDataset(tmp_path, "digits", "test")
    # a folder of another task: labels valid for digits but 102-class lines are refused by a 10-class task
    (task / "test.txt").write_text("images/test/000000.jpg 57\n")
    with pytest.raises(LabelOutOfRangeError, match="does not belong to this task"):
        VTABFolderDataset(tmp_path, "digits", "test")


def test_malformed_line(jpg_root, tmp_path):
    task = _copy_task(jpg_root, tmp_path)
    (task / "val200.txt").write_text("images/val200/000000.jpg\n")
    with pytest.raises(SplitFormatError, match="val200.txt:1"):
        VTABFolderDataset(tmp_path, "digits", "val200")


def test_missing_image_file_is_named(jpg_root, tmp_path):
    task = _copy_task(jpg_root, tmp_path)
    (task / "images" / "test" / "000123.jpg").unlink()
    with pytest.raises(DataNotFoundError, match=r"1 of 797 images .* missing.*000123\.jpg"):
        VTABFolderDataset(tmp_path, "digits", "test")
    ds = VTABFolderDataset(tmp_path, "digits", "test", check_files=False)  # opt-out still possible
    assert len(ds) == 797


@pytest.mark.parametrize("workers", [1, 3])
def test_corrupt_jpeg_is_named_when_read_and_by_verify(jpg_root, tmp_path, workers):
    task = _copy_task(jpg_root, tmp_path)
    bad = task / "images" / "val200" / "000007.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    junk = task / "images" / "val200" / "000011.jpg"
    junk.write_bytes(b"this is not a jpeg")
    ds = VTABFolderDataset(tmp_path, "digits", "val200")  # exists -> construction passes
    ds[6]
    with pytest.raises(CorruptImageError, match="000007.jpg"):
        ds[7]
    with pytest.raises(CorruptImageError, match="000011.jpg"):
        ds[11]
    with pytest.raises(CorruptImageError) as e:
        verify_images(ds, workers=workers)
    assert "000007.jpg" in str(e.value) and "000011.jpg" in str(e.value) and "2 undecodable" in str(e.value)
    assert "--overwrite" in str(e.value)
    assert verify_images(VTABFolderDataset(tmp_path, "digits", "train800"), workers=workers) == 800


def test_datamodule_verifies_images_up_front_once(jpg_root, tmp_path, monkeypatch):
    """verify_images=True: a corrupt image fails the data module's construction (before any training); a
    clean split is remembered by a stamp, so the next construction decodes nothing; rewriting the split list
    invalidates the stamp."""
    task = _copy_task(jpg_root, tmp_path)
    bad = task / "images" / "test" / "000005.jpg"
    good_bytes = bad.read_bytes()
    bad.write_bytes(good_bytes[:50])
    kw = dict(batch_size=32, num_workers=0, image_size=32, verify_images=True)
    with pytest.raises(CorruptImageError, match="000005.jpg"):
        VTABDataModule("digits", tmp_path, **kw)
    assert not (task / ".verified_test.json").exists()
    bad.write_bytes(good_bytes)
    VTABDataModule("digits", tmp_path, **kw)
    assert sorted(p.name for p in task.glob(".verified_*.json")) == [".verified_test.json",
                                                                    ".verified_train800val200.json"]
    decoded = []
    original = VTABFolderDataset.load_image
    monkeypatch.setattr(VTABFolderDataset, "load_image", lambda self, i: decoded.append(i) or original(self, i))
    VTABDataModule("digits", tmp_path, **kw)
    assert decoded == []  # remembered
    lines = (task / "test.txt").read_text().splitlines()
    (task / "test.txt").write_text("\n".join(lines[:-1]) + "\n")  # a re-prepared (different) list
    VTABDataModule("digits", tmp_path, **kw)
    assert len(decoded) == len(lines) - 1  # only the changed split is decoded again


# ---------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------
def test_transform_is_direct_resize_plus_normalise():
    img = Image.new("RGB", (40, 10), color=(255, 0, 128))  # not square: no aspect preservation, no crop
    x = build_transform(32, *get_normalization("imagenet"))(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    mean, std = get_normalization("imagenet")
    expect = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), mean, std)]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expect), atol=1e-3)
    y = build_transform(16, normalization="inception")(img)
    assert y.shape == (3, 16, 16) and torch.allclose(y[0], torch.ones(16, 16), atol=1e-3)  # 255 -> +1


def test_transform_interpolation_is_bicubic_by_default():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    x = build_transform(32, normalization="inception")(img)
    ref = np.asarray(img.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
    assert np.abs(x.permute(1, 2, 0).numpy() - ref).max() < 1e-5
    nearest = build_transform(32, normalization="inception", interpolation="nearest")(img)
    assert not torch.allclose(x, nearest)


def test_bad_transform_options():
    with pytest.raises(UnknownChoiceError, match="imagenet"):
        get_normalization("imagenett")
    with pytest.raises(UnknownChoiceError, match="bicubic"):
        build_transform(32, interpolation="cubic")
    with pytest.raises(ValueError):
        build_transform(32, mean=(0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------------------------------------
# DataModule
# ---------------------------------------------------------------------------------------------------------
def test_datamodule_on_the_folder(jpg_root):
    dm = VTABDataModule("digits", jpg_root, batch_size=32, eval_batch_size=100, num_workers=0, image_size=32)
    assert dm.num_classes == 10 and dm.data_format == "jpeg_folder"
    train = list(dm.train_dataloader())
    assert len(train) == 1000 // 32 and all(x.shape == (32, 3, 32, 32) for x, _ in train)  # drop_last
    test = list(dm.test_dataloader())
    assert sum(len(y) for _, y in test) == 797
    assert torch.equal(torch.cat([y for _, y in dm.val_dataloader()]), torch.cat([y for _, y in test]))
    assert torch.equal(torch.cat([y for _, y in test]),
                       torch.as_tensor(digits_arrays()[1][digits_split_indices("test")]))
    # the training order is seeded
    again = VTABDataModule("digits", jpg_root, batch_size=32, num_workers=0, image_size=32, seed=0)
    other = VTABDataModule("digits", jpg_root, batch_size=32, num_workers=0, image_size=32, seed=1)
    y0 = next(iter(again.train_dataloader()))[1]
    assert torch.equal(y0, train[0][1]) and not torch.equal(y0, next(iter(other.train_dataloader()))[1])
    info = dm.describe()
    assert info["sizes"] == {"train800val200": 1000, "test": 797} and info["data_format"] == "jpeg_folder"


def test_datamodule_tuning_splits(jpg_root):
    dm = VTABDataModule("digits", jpg_root, train_split="train800", eval_split="val200", num_workers=0,
                        image_size=16)
    assert sum(len(y) for _, y in dm.test_dataloader()) == 200
    assert len(dm.train_dataloader()) == 800 // 32


def test_datamodule_embedded_needs_no_root():
    dm = VTABDataModule("digits", None, source="embedded", image_size=32, batch_size=50)
    assert dm.data_format == "embedded_sklearn_digits" and dm.num_workers == 0
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 3, 32, 32) and y.dtype == torch.long
    assert sum(len(y) for _, y in dm.test_dataloader()) == 797


def test_datamodule_validates_before_any_model_work(tmp_path):
    with pytest.raises(DataNotFoundError, match="pyra_bench.data.prepare --tasks cifar100"):
        VTABDataModule("cifar100", tmp_path / "missing")
    with pytest.raises(UnknownChoiceError):
        VTABDataModule("cifar1000", tmp_path)
    with pytest.raises(ValueError, match="only 'digits'"):
        VTABDataModule("cifar100", None, source="embedded")
    with pytest.raises(ValueError, match="unknown data source"):
        VTABDataModule("digits", None, source="tfds")
    with pytest.raises(ValueError, match="unknown eval_split"):
        VTABDataModule("digits", None, source="embedded", eval_split="validation")
    with pytest.raises(UnknownChoiceError, match="normalization"):
        VTABDataModule("digits", None, source="embedded", normalization="imagenet21k")


def test_verification_stamp_falls_back_to_the_cache_for_a_read_only_data_folder(jpg_root, tmp_path, monkeypatch):
    from pyra_bench import fileio
    from pyra_bench.data import verify_once

    task = _copy_task(jpg_root, tmp_path / "data")
    monkeypatch.setenv("PYRA_BENCH_CACHE", str(tmp_path / "cache"))
    real = fileio.atomic_write_text

    def read_only_data(path, data):
        if str(path).startswith(str(task)):
            raise PermissionError(f"read-only: {path}")
        return real(path, data)

    monkeypatch.setattr(fileio, "atomic_write_text", read_only_data)
    ds = VTABFolderDataset(tmp_path / "data", "digits", "val200")
    assert verify_once(ds, progress=False) is True
    assert not list(task.glob(".verified_*")) and len(list((tmp_path / "cache" / "verified").glob("*.json"))) == 1
    assert verify_once(ds, progress=False) is False  # remembered in the cache
