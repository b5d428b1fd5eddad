"""The VTAB-1k folder dataset, transforms and the DataModule, on real images (the digits task as a folder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.files import file_mode as _mode
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
    assert f"python -m pyra_bench.data.prepare tasks=cifar100 data_root={root}" in str(e.value)
    assert isinstance(e.value, FileNotFoundError)


def test_missing_task_folder_names_the_prepare_command(jpg_root):
    with pytest.raises(DataNotFoundError, match=r"task folder not found.*\n.*tasks=dtd data_root="):
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
    with pytest.raises(DataNotFoundError, match="pyra_bench.data.prepare tasks=cifar100"):
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


# ---------------------------------------------------------------------------------------------------------
# Split lists that would give a wrong result: duplicated lines, paths outside the task, not UTF-8
# ---------------------------------------------------------------------------------------------------------
def _copy_lists(src_root, dst_root, images=()):
    """A copy of the digits task's split lists (and of the listed ``images`` only): cheap, for tests that
    never read the other images (datasets built with ``check_files=False``)."""
    import shutil

    task = dst_root / "digits"
    (task / "images").mkdir(parents=True)
    for f in (src_root / "digits").glob("*.txt"):
        shutil.copy(f, task / f.name)
    for rel in images:
        (task / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src_root / "digits" / rel, task / rel)
    return task


def test_duplicated_lines_are_refused_naming_file_lines_and_entry(jpg_root, tmp_path):
    from pyra_bench.data.folder import DuplicateEntryError

    task = _copy_lists(jpg_root, tmp_path)
    lines = (task / "test.txt").read_text().splitlines()
    assert len(lines) == 797
    (task / "test.txt").write_text("\n".join(lines + lines) + "\n")  # the list concatenated twice
    with pytest.raises(DuplicateEntryError) as e:
        VTABFolderDataset(tmp_path, "digits", "test", check_files=False)
    msg = str(e.value)
    assert "test.txt" in msg and "797 duplicated entries (first 5 shown)" in msg
    assert "'images/test/000000.jpg' on lines 1 and 798" in msg and "--overwrite" in msg
    assert isinstance(e.value, SplitFormatError) and isinstance(e.value, ValueError)
    # the same image spelt differently, with another label: still one image listed twice
    rel, label = lines[3].rsplit(" ", 1)
    (task / "test.txt").write_text("\n".join(lines + [f"./{rel} {(int(label) + 1) % 10}"]) + "\n")
    with pytest.raises(DuplicateEntryError, match=rf"1 duplicated entry: '{rel}' on lines 4 and 798 \(labels"):
        VTABFolderDataset(tmp_path, "digits", "test", check_files=False)


@pytest.mark.parametrize("bad", ["/etc/passwd", "../digits/images/test/000000.jpg", "images/../../x.jpg",
                                 "C:\\images\\x.jpg", "images\\..\\..\\x.jpg"])
def test_paths_leaving_the_task_folder_are_refused(jpg_root, tmp_path, bad):
    from pyra_bench.data.folder import UnsafePathError

    task = _copy_lists(jpg_root, tmp_path)
    lines = (task / "val200.txt").read_text().splitlines()
    lines[2] = f"{bad} 3"
    (task / "val200.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(UnsafePathError) as e:
        VTABFolderDataset(tmp_path, "digits", "val200", check_files=False)
    msg = str(e.value)
    assert "val200.txt:3" in msg and repr(bad) in msg and ("absolute" in msg or "'..'" in msg)


def test_a_list_that_is_not_utf8_is_refused_with_the_byte_offset(jpg_root, tmp_path):
    from pyra_bench.data.folder import SplitEncodingError

    task = _copy_lists(jpg_root, tmp_path)
    data = (task / "train800.txt").read_bytes()
    first = data.index(b"\n") + 1  # start of line 2
    (task / "train800.txt").write_bytes(data[:first] + "images/train800/caf\u00e9.jpg 1\n".encode("latin-1")
                                        + data[first:])
    offset = first + len("images/train800/caf")
    with pytest.raises(SplitEncodingError) as e:
        VTABFolderDataset(tmp_path, "digits", "train800", check_files=False)
    msg = str(e.value)
    assert "train800.txt" in msg and f"byte offset {offset} (line 2)" in msg and "UTF-8" in msg
    # a UTF-8 byte-order mark (Windows editors) is fine
    (task / "train800.txt").write_bytes(b"\xef\xbb\xbf" + data)
    assert VTABFolderDataset(tmp_path, "digits", "train800", check_files=False).samples[0][0].name == "000000.jpg"


def test_labels_are_ascii_integers(jpg_root, tmp_path):
    task = _copy_lists(jpg_root, tmp_path)
    (task / "val200.txt").write_text("images/val200/000000.jpg \u0663\n")  # int() would read Arabic-Indic 3
    with pytest.raises(SplitFormatError, match="val200.txt:1"):
        VTABFolderDataset(tmp_path, "digits", "val200")


# ---------------------------------------------------------------------------------------------------------
# Image modes PIL converts lossily, and images past PIL's size limit
# ---------------------------------------------------------------------------------------------------------
def _as_16bit_png(src, dst, scale=257):
    """Rewrite the 8-bit grey image ``src`` as a 16-bit greyscale PNG ``dst`` (v -> v * scale)."""
    a8 = np.asarray(Image.open(src).convert("L"), dtype=np.uint16)
    Image.fromarray(a8 * scale).save(dst)  # a uint16 array -> PIL mode I;16
    return a8


def test_16bit_png_gives_the_same_input_and_prediction_as_its_8bit_version(png_root, tmp_path):
    from pyra_bench.models import create_backbone

    _copy_lists(png_root, tmp_path)
    ds8 = VTABFolderDataset(png_root, "digits", "test", transform=build_transform(32))
    ds16 = VTABFolderDataset(tmp_path, "digits", "test", transform=build_transform(32), check_files=False)
    idx = [0, 1, 2, 100, 796]
    for j in idx:
        ds16.samples[j][0].parent.mkdir(parents=True, exist_ok=True)
        _as_16bit_png(ds8.samples[j][0], ds16.samples[j][0])
    path = ds16.samples[0][0]
    with Image.open(path) as img:
        assert img.mode == "I;16"  # the premise: this really is a 16-bit image ...
        naive = np.asarray(img.convert("RGB"))  # ... that PIL's own conversion turns black and white
    assert set(np.unique(naive)) <= {0, 255} and len(np.unique(np.asarray(Image.open(ds8.samples[0][0])))) > 2
    x8 = torch.stack([ds8[j][0] for j in idx])
    x16 = torch.stack([ds16[j][0] for j in idx])
    assert torch.equal(x8, x16)  # v * 257 >> 8 == v: the same tensor after the transform
    model = create_backbone("vit_tiny_test", 10).eval()
    with torch.no_grad():
        assert torch.equal(model(x8).argmax(-1), model(x16).argmax(-1))


def test_16bit_values_are_scaled_to_8bit_within_one_level(png_root, tmp_path):
    """Arbitrary 16-bit values (not multiples of 257) land within 1/255 of their exact 8-bit value."""
    _copy_lists(png_root, tmp_path, images=["images/val200/000000.png"])
    ds = VTABFolderDataset(tmp_path, "digits", "val200", check_files=False)
    rng = np.random.default_rng(0)
    a16 = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    Image.fromarray(a16).save(ds.samples[0][0])
    rgb = np.asarray(ds[0][0], dtype=np.float64)
    assert rgb.shape == (8, 8, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0] - a16 / 65535 * 255).max() <= 1.0


@pytest.mark.parametrize("mode,dtype", [("F", np.float32), ("I", np.int32)])
def test_modes_without_an_8bit_range_are_refused_by_name(jpg_root, tmp_path, mode, dtype):
    """32-bit integer and float images (e.g. TIFF) have no fixed range: refused, not clipped to black/white."""
    from pyra_bench.data.folder import UnsupportedImageModeError

    task = _copy_lists(jpg_root, tmp_path, images=["images/test/000000.jpg"])
    Image.fromarray(np.full((8, 8), 300, dtype=dtype)).save(task / "images" / "test" / "odd.tif")
    (task / "test.txt").write_text("images/test/000000.jpg 0\nimages/test/odd.tif 1\n")
    ds = VTABFolderDataset(tmp_path, "digits", "test")
    ds[0]
    with pytest.raises(UnsupportedImageModeError, match=rf"odd\.tif has PIL mode '{mode}'"):
        ds[1]
    with pytest.raises(CorruptImageError, match=r"(?s)1 undecodable.*odd\.tif"):
        verify_images(ds)


@pytest.mark.parametrize("limit", [40, 20])  # 8x8 = 64 pixels: PIL warns above the limit, raises above twice it
def test_images_past_the_decompression_bomb_limit_are_refused_by_name(jpg_root, monkeypatch, limit):
    import warnings

    from pyra_bench.data.folder import ImageTooLargeError

    ds = VTABFolderDataset(jpg_root, "digits", "val200")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw DecompressionBombWarning either
        with pytest.raises(ImageTooLargeError) as e:
            ds[3]
    assert "000003.jpg" in str(e.value) and "MAX_IMAGE_PIXELS" in str(e.value)
    assert isinstance(e.value, CorruptImageError)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)
    assert ds[3][0].size == (8, 8)  # at the limit: fine


# ---------------------------------------------------------------------------------------------------------
# Files are made with the user's umask
# ---------------------------------------------------------------------------------------------------------
# (the ``umask`` fixture is in conftest.py)


def test_prepared_task_folder_follows_the_umask(tmp_path, umask):
    """umask 022: folders 0755, files 0644 -- what mkdir / open() give (tempfile.mkdtemp would give 0700)."""
    from pyra_bench.data import verify_once

    umask(0o022)
    task = write_digits_folder(tmp_path / "data")  # staged in a temporary folder, renamed at the end
    assert _mode(task) == 0o755 and _mode(task / "images" / "val200") == 0o755
    assert _mode(task / "val200.txt") == 0o644 and _mode(task / "meta.json") == 0o644
    assert _mode(task / "images" / "val200" / "000000.jpg") == 0o644
    assert not list((tmp_path / "data").glob(".digits.*"))
    verify_once(VTABFolderDataset(tmp_path / "data", "digits", "val200"), progress=False)
    assert _mode(task / ".verified_val200.json") == 0o644


def test_staged_task_folder_follows_another_umask(tmp_path, umask):
    from pyra_bench.data.folder import staged_task_folder, write_meta, write_split_list

    umask(0o027)
    with staged_task_folder(tmp_path, "dtd") as tmp:
        assert _mode(tmp) == 0o750  # already while staged
        write_split_list(tmp / "test.txt", [("images/test/000000.jpg", 1)])
        write_meta(tmp, {"task": "dtd"})
    assert _mode(tmp_path / "dtd") == 0o750 and _mode(tmp_path / "dtd" / "test.txt") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dtd"]


def test_a_failed_staging_leaves_no_temporary_folder(tmp_path, umask):
    from pyra_bench.data.folder import staged_task_folder

    umask(0o022)
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_task_folder(tmp_path, "dtd") as tmp:
            (tmp / "train800.txt").write_text("x 0\n")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
