"""The VTAB-1k task table: order, class counts, split strings, label derivations, TFDS metadata."""

from __future__ import annotations

import numpy as np
import pytest

from pyra_bench.data.tasks import (
    GROUPS,
    TASKS,
    VTAB_TASKS,
    derive_label,
    get_task,
    resolve_split,
    resolve_tasks,
    task_names,
)
from pyra_bench.registry import UnknownChoiceError

# Spec section 6 (folder name -> classes), in the paper's column order.
PAPER_COLUMNS = {
    "cifar100": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_pet": 37, "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}

# train800val200 / test as concrete strings, from an independent source: Scenic's VTAB config
# (scenic/projects/.../vtab configs, written against the real TFDS sizes), and task_adaptation itself.
CONCRETE = {
    "cifar100": ("train[:800]+train[45000:45200]", "test"),
    "caltech101": ("train[:800]+train[2754:2954]", "test"),
    "dtd": ("train[:800]+validation[:200]", "test"),
    "oxford_flowers102": ("train[:800]+validation[:200]", "test"),
    "oxford_pet": ("train[:800]+train[2944:3144]", "test"),
    "svhn": ("train[:800]+train[65931:66131]", "test"),
    "sun397": ("train[:800]+validation[:200]", "test"),
    "patch_camelyon": ("train[:800]+validation[:200]", "test"),
    "eurosat": ("train[:800]+train[16200:16400]", "train[21600:]"),
    "resisc45": ("train[:800]+train[18900:19100]", "train[25200:]"),
    "diabetic_retinopathy": ("train[:800]+validation[:200]", "test"),
    "clevr_count": ("train[:800]+train[63000:63200]", "validation"),
    "clevr_dist": ("train[:800]+train[63000:63200]", "validation"),
    "dmlab": ("train[:800]+validation[:200]", "test"),
    "kitti": ("train[:800]+validation[:200]", "test"),
    "dsprites_loc": ("train[:800]+train[589824:590024]", "train[663552:]"),
    "dsprites_ori": ("train[:800]+train[589824:590024]", "train[663552:]"),
    "smallnorb_azi": ("train[:800]+test[:200]", "test[50%:]"),
    "smallnorb_ele": ("train[:800]+test[:200]", "test[50%:]"),
}

# Standard VTAB test-split sizes (PYRA reference table).
TEST_SIZES = {
    "cifar100": 10000, "caltech101": 6084, "dtd": 1880, "oxford_flowers102": 6149, "oxford_pet": 3669,
    "svhn": 26032, "sun397": 21750, "patch_camelyon": 32768, "eurosat": 5400, "resisc45": 6300,
    "diabetic_retinopathy": 42670, "clevr_count": 15000, "clevr_dist": 15000, "dmlab": 22735, "kitti": 711,
    "dsprites_loc": 73728, "dsprites_ori": 73728, "smallnorb_azi": 12150, "smallnorb_ele": 12150,
}


def test_paper_order_groups_and_class_counts():
    assert VTAB_TASKS == list(PAPER_COLUMNS)
    assert {t: get_task(t).num_classes for t in VTAB_TASKS} == PAPER_COLUMNS
    assert [len(GROUPS[g]) for g in ("natural", "specialized", "structured")] == [7, 4, 8]
    assert sum(GROUPS.values(), []) == VTAB_TASKS
    assert all(get_task(t).group == g for g, ts in GROUPS.items() for t in ts)
    assert get_task("digits").group == "demo" and get_task("digits").num_classes == 10
    assert "digits" not in VTAB_TASKS and task_names()[-1] == "digits"
    assert len({get_task(t).display for t in VTAB_TASKS}) == 19


def test_unknown_task_lists_valid_choices():
    with pytest.raises(UnknownChoiceError) as e:
        get_task("cifar1000")
    msg = str(e.value)
    assert "cifar1000" in msg and "cifar100" in msg and "smallnorb_ele" in msg and "digits" in msg
    assert isinstance(e.value, KeyError)


def test_resolve_tasks():
    assert resolve_tasks("all") == VTAB_TASKS
    assert resolve_tasks("specialized") == GROUPS["specialized"]
    assert resolve_tasks("dtd, cifar100,dtd") == ["dtd", "cifar100"]
    assert resolve_tasks("digits") == ["digits"]
    with pytest.raises(UnknownChoiceError, match="valid choices.*natural"):
        resolve_tasks("cifar100,nope")


@pytest.mark.parametrize("task", VTAB_TASKS)
def test_split_strings_match_the_concrete_vtab_splits(task):
    spec = get_task(task)
    s = spec.resolve_splits(spec.reference_sizes)
    assert (s["train800val200"], s["test"]) == CONCRETE[task]
    assert s["train800val200"] == f"{s['train800']}+{s['val200']}"
    assert s["train800"] == "train[:800]"


@pytest.mark.parametrize("task", VTAB_TASKS)
def test_split_sizes_with_the_real_tfds_sizes(task):
    from pyra_bench.data.prepare import absolute_ranges

    spec = get_task(task)
    s = spec.resolve_splits(spec.reference_sizes)
    n = {k: sum(b - a for _, a, b in absolute_ranges(v, spec.reference_sizes)) for k, v in s.items()}
    assert n == {"train800": 800, "val200": 200, "train800val200": 1000, "test": TEST_SIZES[task]}
    # val200 never overlaps train800 nor test
    ranges = {k: absolute_ranges(v, spec.reference_sizes) for k, v in s.items()}
    for other in ("train800", "test"):
        for (sa, a0, a1) in ranges["val200"]:
            for (sb, b0, b1) in ranges[other]:
                assert sa != sb or a1 <= b0 or b1 <= a0, (task, other)


def test_resolve_split_placeholders():
    assert resolve_split("train[{train@90}:{train@90+200}]", {"train": 3060}) == "train[2754:2954]"
    # floors each term separately, like task_adaptation (60 % and 20 % of 27,001)
    assert resolve_split("train[{train@60+train@20}:]", {"train": 27001}) == "train[21600:]"
    with pytest.raises(KeyError, match="needs the size of TFDS split 'train'"):
        resolve_split("train[{train@90}:]", {"test": 10})


# ---- label derivations (expected values worked out by hand from task_adaptation's TF code)
def _objs(**cols):
    return {"objects": {k: np.asarray(v) for k, v in cols.items()}}


def test_label_key_and_bin():
    assert derive_label("key:label", {"label": np.int64(7)}) == 7
    assert derive_label("key:label_azimuth", {"label_azimuth": 17}) == 17
    # dSprites x-position: 32 values -> 16 classes (pairs)
    assert [derive_label("bin:label_x_position:32:16", {"label_x_position": v}) for v in (0, 1, 2, 3, 31)] == \
        [0, 0, 1, 1, 15]
    # orientation: 40 values -> 16 classes, floor(v / 2.5)
    assert [derive_label("bin:label_orientation:40:16", {"label_orientation": v}) for v in (0, 2, 3, 5, 7, 39)] \
        == [0, 0, 1, 2, 2, 15]
    full = {derive_label("bin:label_orientation:40:16", {"label_orientation": v}) for v in range(40)}
    assert full == set(range(16))


def test_label_clevr():
    spec = get_task("clevr_count").label_fn
    assert derive_label(spec, _objs(size=[0, 1, 0])) == 0  # 3 objects
    assert derive_label(spec, _objs(size=[0] * 10)) == 7  # 10 objects
    dist = get_task("clevr_dist").label_fn  # thresholds 0, 8, 8.5, 9, 9.5, 10, 100 on min depth
    def d(*depths):
        return derive_label(dist, _objs(pixel_coords=[[10.0, 20.0, z] for z in depths]))
    assert [d(7.9), d(8.0), d(8.2), d(12.0, 9.2), d(9.99), d(10.01), d(50)] == [0, 0, 1, 3, 4, 5, 5]


def test_label_kitti_closest_vehicle():
    spec = get_task("kitti").label_fn  # type < 3 = Car/Van/Truck; thresholds -100, 8, 20, 999; none -> 1000
    def k(types, zs):
        return derive_label(spec, _objs(type=types, location=[[1.0, 1.5, z] for z in zs]))
    assert k([0], [5.0]) == 0
    assert k([1], [15.0]) == 1
    assert k([2], [25.0]) == 2
    assert k([3, 5], [2.0, 3.0]) == 3  # pedestrians only: "no vehicle"
    assert k([3, 0], [1.0, 30.0]) == 2  # the pedestrian nearer does not count
    assert k([0, 1], [30.0, 7.0]) == 0  # the nearest vehicle decides
    assert derive_label(spec, {"objects": {"type": np.zeros(0, np.int64), "location": np.zeros((0, 3))}}) == 3


def test_unknown_label_spec():
    with pytest.raises(ValueError, match="unknown label spec"):
        derive_label("nope:label", {"label": 1})


# ---- the table against the installed TFDS package's metadata (no download)
@pytest.mark.parametrize("task", VTAB_TASKS)
def test_table_agrees_with_tfds_metadata(task, tmp_path):
    pytest.importorskip("tensorflow_datasets")
    from pyra_bench.data.prepare import open_builder

    spec = get_task(task)
    builder, note = open_builder(spec, data_dir=tmp_path)
    if not spec.version_fallbacks:
        assert note is None  # the VTAB-pinned version itself
    elif note is not None:  # e.g. TFDS 4.9.x ships only oxford_iiit_pet 4.0.0: recorded, not silent
        assert spec.tfds_builder in note and builder.info.full_name in note
    f = builder.info.features
    kind, *args = spec.label_fn.split(":")
    if kind == "key":
        assert f[args[0]].num_classes == spec.num_classes  # VTAB reads the class count from TFDS
    elif kind == "bin":
        assert f[args[0]].num_classes == int(args[1])  # dSprites cardinalities: 32 x-positions, 40 angles
    else:
        seq, attr = args[0].split("/")
        assert attr in f[seq].feature
    channels = f[spec.image_key].shape[-1]
    assert (channels == 1) == spec.tile_channels
    assert bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)) == spec.manual_download


def test_every_task_spec_is_complete():
    for name in VTAB_TASKS:
        s = TASKS.get(name)
        assert s.tfds_builder and s.vtab_name and s.source == "tfds"
        assert set(s.split_templates()) == {"train800", "val200", "train800val200", "test"}
    with pytest.raises(ValueError, match="not read from TFDS"):
        get_task("digits").split_templates()
