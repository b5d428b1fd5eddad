"""TFDS -> VTAB-1k folder preparation, for all 19 tasks, offline under ``tfds.testing.mock_data``.

The mock keeps each data set's real TFDS features (images, label cardinalities, CLEVR/KITTI object
sequences) with random values, and gives each split its own size and its own examples, so the expected
slices below (written out by hand from task_adaptation's definitions for these sizes) are checked by
comparing labels example by example.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from pyra_bench.data import VTAB_TASKS, CorruptImageError, VTABFolderDataset, derive_label, get_task  # noqa: E402
from pyra_bench.data import prepare as P  # noqa: E402
from pyra_bench.data.folder import existing_task_status  # noqa: E402

# Fake TFDS split sizes: big enough for every VTAB slice (train@90 + 200 <= train), small enough to be fast.
SIZES = {"train": 2000, "validation": 200, "test": 60, "smallnorb/test": 400}
MAX_VALUE = {"dsprites": 2}  # dSprites pixels are {0, 1}

# For these sizes: (tfds split, start, stop) of val200 and test, per task_adaptation's definitions.
V90, V80, V60 = ("train", 1800, 2000), ("train", 1600, 1800), ("train", 1200, 1400)
VAL = ("validation", 0, 200)
EXPECTED = {
    "cifar100": (V90, ("test", 0, 60)), "caltech101": (V90, ("test", 0, 60)),
    "dtd": (VAL, ("test", 0, 60)), "oxford_flowers102": (VAL, ("test", 0, 60)),
    "oxford_pet": (V80, ("test", 0, 60)), "svhn": (V90, ("test", 0, 60)), "sun397": (VAL, ("test", 0, 60)),
    "patch_camelyon": (VAL, ("test", 0, 60)),
    "eurosat": (V60, ("train", 1600, 2000)), "resisc45": (V60, ("train", 1600, 2000)),
    "diabetic_retinopathy": (VAL, ("test", 0, 60)),
    "clevr_count": (V90, ("validation", 0, 200)), "clevr_dist": (V90, ("validation", 0, 200)),
    "dmlab": (VAL, ("test", 0, 60)), "kitti": (VAL, ("test", 0, 60)),
    "dsprites_loc": (V80, ("train", 1800, 2000)), "dsprites_ori": (V80, ("train", 1800, 2000)),
    "smallnorb_azi": (("test", 0, 200), ("test", 200, 400)), "smallnorb_ele": (("test", 0, 200), ("test", 200, 400)),
}


def _labels(ds):
    return [lab for _, lab in ds.samples]


@pytest.mark.parametrize("task", VTAB_TASKS)
def test_prepare_every_task_under_mock_tfds(task, tmp_path):
    spec = get_task(task)
    with P.mock_tfds(SIZES, max_value=MAX_VALUE):
        out = P.prepare_task(task, tmp_path, mock=True, progress=False, workers=2)
        builder, _ = P.open_builder(spec)
        # Expected labels, read straight from the (mocked) TFDS data sources at the hand-written ranges.
        def expected(split, a, b):
            src = builder.as_data_source(split=split)
            return [derive_label(spec.label_fn, src[i]) for i in range(a, b)]

        want = {"train800": expected("train", 0, 800), "val200": expected(*EXPECTED[task][0]),
                "test": expected(*EXPECTED[task][1])}
    assert out == tmp_path / task
    ds = {s: VTABFolderDataset(tmp_path, task, s) for s in P.SPLITS}  # labels range-checked here
    n_test = EXPECTED[task][1][2] - EXPECTED[task][1][1]
    assert {s: len(d) for s, d in ds.items()} == {"train800": 800, "val200": 200, "train800val200": 1000,
                                                  "test": n_test}
    for s in ("train800", "val200", "test"):
        assert _labels(ds[s]) == want[s], s
    assert _labels(ds["train800val200"]) == want["train800"] + want["val200"]
    union = ds["train800"].samples + ds["val200"].samples
    assert all(a.read_bytes() == b.read_bytes() for (a, _), (b, _) in zip(ds["train800val200"].samples, union))
    # all labels within the task's classes; more than one class seen where the fake data allows it
    all_labels = np.array(sum(want.values(), []))
    assert all_labels.min() >= 0 and all_labels.max() < spec.num_classes
    if spec.label_fn.startswith(("key:", "bin:")):
        assert len(set(all_labels.tolist())) > 1
    # images: RGB JPEGs at the feature's native size
    img = ds["test"].load_image(0)
    shape = builder.info.features[spec.image_key].shape
    if shape[0] is not None:
        assert img.size == (shape[1], shape[0])
    arr = np.asarray(img, dtype=np.int16)
    if spec.tile_channels:  # grey tiled to RGB
        assert np.abs(arr[..., 0] - arr[..., 1]).max() <= 2 and np.abs(arr[..., 0] - arr[..., 2]).max() <= 2
    if spec.scale255:  # {0, 1} x 255: essentially black and white (up to JPEG ringing)
        assert arr.max() > 200 and np.mean((arr > 60) & (arr < 195)) < 0.2
    meta = json.loads((out / "meta.json").read_text())
    assert meta["complete"] and meta["mock_data"] and meta["jpeg_quality"] == 75
    assert meta["counts"]["train800val200"] == 1000 and meta["tfds_builder"] == builder.info.full_name
    assert meta["split_strings"]["train800val200"] == f"{meta['split_strings']['train800']}+" \
                                                      f"{meta['split_strings']['val200']}"
    assert not list(tmp_path.glob(".*partial*"))


def _prep(task, root, **kw):
    with P.mock_tfds(SIZES, max_value=MAX_VALUE):
        return P.prepare_task(task, root, mock=True, progress=False, **kw)


def test_idempotent_overwrite_and_quality(tmp_path):
    out = _prep("patch_camelyon", tmp_path)
    meta = (out / "meta.json").read_text()
    first = (out / "images" / "test" / "000000.jpg").read_bytes()
    _prep("patch_camelyon", tmp_path, jpeg_quality=95)  # finished: skipped, nothing rewritten
    assert (out / "meta.json").read_text() == meta
    _prep("patch_camelyon", tmp_path, jpeg_quality=95, overwrite=True)
    assert json.loads((out / "meta.json").read_text())["jpeg_quality"] == 95
    assert len((out / "images" / "test" / "000000.jpg").read_bytes()) > len(first)  # higher quality, bigger
    assert not list(tmp_path.glob(".*"))  # no temp or old folders left


def test_interrupted_prepare_leaves_no_task_folder(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = P._save_jpeg

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 300:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of train800
        return real(*a, **k)

    monkeypatch.setattr(P, "_save_jpeg", flaky)
    with pytest.raises(KeyboardInterrupt):
        _prep("dtd", tmp_path)
    assert not (tmp_path / "dtd").exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(P, "_save_jpeg", real)
    _prep("dtd", tmp_path)  # a re-run then completes
    assert existing_task_status(tmp_path / "dtd") == "complete"


def test_stale_partial_folder_is_cleaned_and_incomplete_folder_refused(tmp_path):
    (tmp_path / ".dtd.partial-abc").mkdir(parents=True)
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "train800.txt").write_text("")
    with pytest.raises(P.PrepareError, match="not a complete VTAB-1k task folder.*overwrite=true"):
        _prep("dtd", tmp_path)
    _prep("dtd", tmp_path, overwrite=True)
    assert existing_task_status(tmp_path / "dtd") == "complete"
    assert not (tmp_path / ".dtd.partial-abc").exists()


def test_label_outside_the_class_range_stops_preparation(tmp_path):
    bad = replace(get_task("cifar100"), num_classes=5)  # cifar100 labels go up to 99
    with pytest.raises(P.PrepareError, match=r"has label \d+, outside \[0, 5\)"):
        _prep(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_split_sizes_too_small_for_the_vtab_slices(tmp_path):
    with P.mock_tfds({"train": 1000, "*": 300}):
        with pytest.raises(P.PrepareError, match=r"train\[900:1100\].*does not fit"):
            P.prepare_task("cifar100", tmp_path, mock=True, progress=False)


def test_explicit_split_sizes_override(tmp_path):
    # the offsets follow the given TFDS sizes (here: pretend train has 2222 examples -> val200 at 1999)
    with P.mock_tfds(2222):
        out = P.prepare_task("svhn", tmp_path, split_sizes={"train": 2222, "test": 30}, progress=False, mock=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["split_strings"]["val200"] == "train[1999:2199]" and meta["counts"]["test"] == 30


def test_verify_detects_a_corrupt_union_image(tmp_path):
    out = _prep("eurosat", tmp_path)
    assert P.verify_task(tmp_path, "eurosat", progress=False)["test"] == 400
    p = out / "images" / "train800val200" / "000900.jpg"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CorruptImageError, match="000900.jpg"):
        P.verify_task(tmp_path, "eurosat", progress=False)


def test_manual_download_task_gives_instructions(tmp_path):
    # Real TFDS builder (no mock, nothing downloaded): must stop before any network access.
    with pytest.raises(P.ManualDownloadError) as e:
        P.prepare_task("diabetic_retinopathy", tmp_path / "vtab", data_dir=tmp_path / "tfds", progress=False)
    msg = str(e.value)
    from pyra_bench.data import prepare_command

    assert "kaggle.com" in msg.lower() and "manual_dir=" in msg
    assert prepare_command("diabetic_retinopathy", tmp_path / "vtab") in msg  # the command, to run once fetched
    assert not (tmp_path / "vtab" / "diabetic_retinopathy").exists()


def test_image_conversion():
    dspr, snorb, rgb = get_task("dsprites_loc"), get_task("smallnorb_ele"), get_task("cifar100")
    binary = np.zeros((64, 64, 1), np.uint8)
    binary[10:20, 30:40] = 1
    out = P.to_rgb_uint8(binary, dspr)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and set(np.unique(out)) == {0, 255}
    grey = np.arange(96 * 96, dtype=np.uint32).reshape(96, 96, 1).astype(np.uint8)
    out = P.to_rgb_uint8(grey, snorb)
    assert out.shape == (96, 96, 3) and (out == grey).all()  # tiled, not rescaled
    col = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert (P.to_rgb_uint8(col, rgb) == col).all()


def test_split_names_parser():
    assert P.split_names_in("train[:800]+train[{train@90}:{train@90+200}]") == {"train"}
    assert P.split_names_in("train[:800]+test[:200]") == {"train", "test"}
    assert P.split_names_in("validation") == {"validation"}
    assert P.split_names_in("train[{train@60+train@20}:]") == {"train"}


def test_cli(tmp_path, capsys, caplog):
    """The command line: Hydra key=value overrides of conf/prepare.yaml (as for train and bench). Mock
    preparation says MOCK DATA, without TFDS's line about the files mock data never has; a run on such a
    folder says FAKE data in one plain log line, not a warning with its source line."""
    import logging
    import warnings

    caplog.set_level(logging.INFO)  # TFDS logs (absl) its "Failed to load ... from files" at INFO
    assert P.main(["tasks=digits", f"data_root={tmp_path}", "verify=true", "progress=false"]) == 0
    assert existing_task_status(tmp_path / "digits") == "complete"
    assert P.main(["tasks=cifar1000", f"data_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'cifar1000'" in err and "valid choices" in err
    assert P.main(["tasks=digits", f"data_root={tmp_path}", "reader=tfrecord"]) == 2
    assert "valid choices: auto, tf.data, data_source" in capsys.readouterr().err
    caplog.clear()
    assert P.main(["tasks=patch_camelyon", f"data_root={tmp_path}", "mock_examples=1000", "progress=false",
                   "workers=2"]) == 0
    meta = json.loads((tmp_path / "patch_camelyon" / "meta.json").read_text())
    assert meta["mock_data"] is True and meta["counts"]["test"] == 1000
    assert "[MOCK DATA]" in capsys.readouterr().out
    assert not [r for r in caplog.records if "from files" in r.getMessage() or "non-existing" in r.getMessage()]
    assert not logging.getLogger("absl").filters  # the filter is gone with the mock
    caplog.clear()
    from pyra_bench.data import VTABDataModule

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning (it would print "warnings.warn(..." under it)
        VTABDataModule("patch_camelyon", tmp_path, num_workers=0, image_size=32)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{tmp_path / 'patch_camelyon'} was prepared from FAKE data (mock_examples=...): its accuracy means nothing"]
    # a folder made elsewhere (no meta.json) is left alone; several tasks as a list
    (tmp_path / "patch_camelyon" / "meta.json").unlink()
    assert existing_task_status(tmp_path / "patch_camelyon") == "foreign"
    assert P.main(["tasks=[patch_camelyon,digits]", f"data_root={tmp_path}", "mock_examples=1000"]) == 0
    out = capsys.readouterr().out
    assert "not made by pyra_bench" in out and "done: 2/2 task(s) ready" in out


# The console entry point as `python -m pyra_bench.data.prepare ARGS` calls it (Hydra parses sys.argv), three
# times in one interpreter (one start-up): a run, bad input, --help.
CLI_SCRIPT = """
import sys
from pyra_bench.data import prepare as P
for argv in (["tasks=digits", "data_root=out", "progress=false"], ["tasks=cifar1000", "data_root=out"], ["--help"]):
    sys.argv = ["python -m pyra_bench.data.prepare", *argv]
    try:
        P.main()
        code = 0
    except SystemExit as e:
        code = e.code
    print("EXIT", code, flush=True)
    print("EXIT", code, file=sys.stderr, flush=True)
"""


def test_cli_is_a_hydra_app_that_writes_only_the_data(tmp_path):
    """A run leaves no Hydra folders or logs, bad input exits with status 2 and one message, --help lists
    the options with their comments."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env.pop("HYDRA_FULL_ERROR", None)
    p = subprocess.run([sys.executable, "-c", CLI_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    # each call's output, then "EXIT <status>" (which starts the next chunk)
    out, err = p.stdout.split("EXIT "), p.stderr.split("EXIT ")
    assert [chunk[:2] for chunk in out[1:]] == ["0\n", "2\n", "0\n"]  # run, bad input, --help
    run, helped, err_bad = out[0], out[2], err[1][2:]
    assert "[prepare] done: 1/1 task(s) ready in out" in run
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]  # no outputs/, .hydra/ or *.log
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["digits"]
    assert err_bad.strip().startswith("python -m pyra_bench.data.prepare: error: unknown task 'cifar1000'; "
                                      "valid choices: all, caltech101, cifar100,")
    assert "Traceback" not in p.stderr
    assert "  mock_examples=null" in helped and "false: fail instead of downloading TFDS data" in helped


def test_images_are_jpeg_at_the_requested_quality(tmp_path):
    out = _prep("cifar100", tmp_path, jpeg_quality=60)
    with Image.open(out / "images" / "val200" / "000000.jpg") as im:
        assert im.format == "JPEG" and im.size == (32, 32) and im.mode == "RGB"
