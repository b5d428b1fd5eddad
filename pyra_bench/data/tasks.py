"""The 19 VTAB-1k tasks (and the embedded demo task), one declarative entry each.

Everything here is data, taken from google-research/task_adaptation (``task_adaptation/data/*.py``, the
versions that define ``train800`` / ``val200`` / ``train800val200``), i.e. what NOAH's / PYRA's
``get_vtab1k.py`` exports to JPEG:

* **Splits.** ``train800`` and ``val200`` are TFDS split strings; ``train800val200`` is always their
  union ``"<train800>+<val200>"`` (the 1,000 images VTAB-1k trains the final model on); ``test`` is the
  full VTAB test split. Where task_adaptation computes an offset from a TFDS split size, the string holds
  a placeholder ``{split@P}`` = ``P * num_examples(split) // 100`` (integer floor, as task_adaptation
  does), and ``{a@60+a@20}`` sums such terms. E.g. cifar100's val200 ``train[{train@90}:{train@90+200}]``
  becomes ``train[45000:45200]`` for the 50,000-image TFDS train split.
* **Labels.** A label spec string, applied to one decoded TFDS example by :func:`derive_label`:

  - ``key:<feature>``: the integer feature itself (most tasks; ``label_azimuth`` for sNORB-Azim);
  - ``bin:<feature>:<cardinality>:<classes>``: ``floor(value / (cardinality / classes))``
    (dSprites: 32 x-positions or 40 orientations grouped into 16 classes);
  - ``count:<sequence>:<offset>``: number of objects + offset (CLEVR count: 3..10 objects -> 0..7);
  - ``closest:<sequence>:<column>:<thresholds>[:<filter>[:<default>]]``: the minimum of one column of an
    object attribute (optionally only objects whose ``<seq>/<attr> < k``, plus a default value),
    binned as task_adaptation does: ``label = max{i : thresholds[i] < value}`` (CLEVR distance: depth
    ``pixel_coords[:, 2]``; KITTI: ``location[:, 2]`` of Car/Van/Truck, 1000 when there is none).
* **Images.** ``tile_channels``: a 1-channel image is tiled to RGB (dSprites, sNORB); ``scale255``:
  dSprites stores {0, 1} pixels, multiplied by 255.

**Folder names.** A task's folder is ``<data_root>/<name>``; ``folder_aliases`` are the other names the
community's VTAB-1k archives use (NOAH's ``get_vtab1k.py``, shared as the NOAH/SSF/VPT zips: ``cifar`` for
cifar100, ``oxford_iiit_pet`` for oxford_pet), looked for when the first is missing.

**Tasks from config.** Any folder-format data set (not only VTAB) is a task through its config
(:func:`task_spec_from_config`, ``conf/task/custom_folder_example.yaml``): name, number of classes, the
folder (under ``data_root`` or absolute) and the split-list file of each split it has.

``reference_sizes`` are the TFDS split sizes of the pinned versions (TFDS catalogue). They are not used
to prepare data (the sizes are read from the TFDS builder), only to document and test the resolved split
strings, which agree with the concrete strings in Scenic's VTAB config (``train[2754:2954]`` for
caltech101, ``train[589824:590024]`` / ``train[663552:]`` for dSprites, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, InputError
from ..registry import Registry, UnknownChoiceError

SPLITS: tuple[str, ...] = ("train800", "val200", "train800val200", "test")
GROUP_NAMES: tuple[str, ...] = ("natural", "specialized", "structured")
#: The group of a task defined only by its config (unless its config names one).
CUSTOM_GROUP = "custom"


class LabelError(InputError, ValueError):
    """A label spec or split placeholder that cannot be applied (the message names it)."""


@dataclass(frozen=True)
class TaskSpec:
    """One task: where its data comes from (TFDS for VTAB-1k, a folder for a task from config), how its
    splits and labels are defined."""

    name: str  # the PYRA / NOAH folder name (``<root>/<name>/``)
    group: str  # natural | specialized | structured | demo | custom (or a config's own)
    num_classes: int
    display: str  # column title in the paper's tables
    tfds_name: str | None = None  # TFDS builder, e.g. "eurosat"
    tfds_config: str | None = None  # e.g. "rgb"
    tfds_version: str | None = None  # the version pattern task_adaptation pins, e.g. "3.*.*"
    vtab_name: str | None = None  # the task_adaptation registry call
    train800: str | None = "train[:800]"  # None for the embedded task (index-based splits, see embedded.py)
    val200: str | None = "validation[:200]"
    test: str | None = "test"
    image_key: str = "image"
    label_fn: str = "key:label"
    tile_channels: bool = False
    scale255: bool = False
    manual_download: bool = False  # TFDS cannot download it: the user fetches the files first
    version_fallbacks: tuple[str, ...] = ()  # tried when this TFDS release no longer has the pinned version
    notes: str = ""  # preparation hints (manual downloads, extra packages)
    reference_sizes: Mapping[str, int] = field(default_factory=dict)
    folder_aliases: tuple[str, ...] = ()  # other folder names under data_root (community archives)
    folder: str | None = None  # a task from config: its folder, under data_root or absolute (None: the name)
    split_files: Mapping[str, str] = field(default_factory=dict)  # split -> list file (default "<split>.txt")

    # -- derived ----------------------------------------------------------------------------------------
    @property
    def train800val200(self) -> str | None:
        """VTAB-1k's final training split: always the union of train800 and val200."""
        return f"{self.train800}+{self.val200}" if self.train800 and self.val200 else None

    @property
    def source(self) -> str:
        """``"tfds"`` for the VTAB tasks, ``"folder"`` for a task from config, ``"embedded"`` for the demo."""
        if self.tfds_name:
            return "tfds"
        return "folder" if self.folder is not None else "embedded"

    def split_file(self, split: str) -> str:
        """The split list's file name, relative to the task folder."""
        return self.split_files.get(split, f"{split}.txt")

    @property
    def tfds_builder(self) -> str | None:
        """The ``tfds.builder`` name with config and pinned version, e.g. ``"eurosat/rgb:2.*.*"``."""
        if not self.tfds_name:
            return None
        cfg = f"/{self.tfds_config}" if self.tfds_config else ""
        return f"{self.tfds_name}{cfg}:{self.tfds_version}"

    def split_templates(self) -> dict[str, str]:
        """The four split strings, with ``{split@P}`` placeholders unresolved."""
        if self.source != "tfds":
            raise ConfigError(f"task {self.name!r} is not read from TFDS (source={self.source!r})")
        return {"train800": self.train800, "val200": self.val200,
                "train800val200": self.train800val200, "test": self.test}

    def resolve_splits(self, sizes: Mapping[str, int]) -> dict[str, str]:
        """The four TFDS split strings for the given TFDS split sizes (``{"train": 50000, ...}``)."""
        return {k: resolve_split(v, sizes) for k, v in self.split_templates().items()}

    def label_feature_names(self) -> list[str]:
        """Top-level TFDS features the label spec reads (to check them against a builder)."""
        kind, *args = self.label_fn.split(":")
        if kind in ("key", "bin"):
            return [args[0]]
        return [args[0].split("/")[0]]


TASKS: Registry[TaskSpec] = Registry("task")


def _t(name: str, group: str, n: int, display: str, tfds_name: str, version: str, vtab_name: str,
       **kw: Any) -> None:
    TASKS.add(name, TaskSpec(name, group, n, display, tfds_name=tfds_name, tfds_version=version,
                             vtab_name=vtab_name, **kw))


# Validation slice carved out of the TFDS train split (task_adaptation's TRAIN_SPLIT_PERCENT).
_VAL90 = "train[{train@90}:{train@90+200}]"
_VAL80 = "train[{train@80}:{train@80+200}]"
_VAL60 = "train[{train@60}:{train@60+200}]"

# ---- Natural (paper column order: Cifar100, Caltech101, DTD, Flowers102, Pets, SVHN, Sun397)
_t("cifar100", "natural", 100, "Cifar100", "cifar100", "3.*.*", "cifar(num_classes=100)", val200=_VAL90,
   reference_sizes={"train": 50000, "test": 10000}, folder_aliases=("cifar",))
_t("caltech101", "natural", 102, "Caltech101", "caltech101", "3.*.*", "caltech101", val200=_VAL90,
   reference_sizes={"train": 3060, "test": 6084})
_t("dtd", "natural", 47, "DTD", "dtd", "3.*.*", "dtd",
   reference_sizes={"train": 1880, "validation": 1880, "test": 1880})
_t("oxford_flowers102", "natural", 102, "Flowers102", "oxford_flowers102", "2.*.*", "oxford_flowers102",
   reference_sizes={"train": 1020, "validation": 1020, "test": 6149})
# TFDS >= 4.9.3 ships only oxford_iiit_pet 4.0.0 ("Fix corrupt images. Add head bounding boxes"): used as a
# recorded fallback when no 3.x data is found in the data dir.
_t("oxford_pet", "natural", 37, "Pets", "oxford_iiit_pet", "3.*.*", "oxford_iiit_pet", val200=_VAL80,
   version_fallbacks=("4.*.*",), reference_sizes={"train": 3680, "test": 3669}, folder_aliases=("oxford_iiit_pet",))
_t("svhn", "natural", 10, "SVHN", "svhn_cropped", "3.*.*", "svhn", val200=_VAL90,
   reference_sizes={"train": 73257, "test": 26032})
_t("sun397", "natural", 397, "Sun397", "sun397", "4.*.*", 'sun397(config="tfds")', tfds_config="tfds",
   notes="a few SUN397 JPEGs fail to decode in some TFDS/TF versions (tensorflow/datasets#2889).",
   reference_sizes={"train": 76128, "validation": 10875, "test": 21750})
# ---- Specialized (Camelyon, EuroSAT, Resisc45, Retinopathy)
_t("patch_camelyon", "specialized", 2, "Camelyon", "patch_camelyon", "2.*.*", "patch_camelyon",
   reference_sizes={"train": 262144, "validation": 32768, "test": 32768})
# EuroSAT / RESISC45: one TFDS split cut 60 / 20 / 20 (each part floored separately).
_t("eurosat", "specialized", 10, "EuroSAT", "eurosat", "2.*.*", 'eurosat(subset="rgb")', tfds_config="rgb",
   val200=_VAL60, test="train[{train@60+train@20}:]", reference_sizes={"train": 27000})
_t("resisc45", "specialized", 45, "Resisc45", "resisc45", "3.*.*", "resisc45", val200=_VAL60,
   test="train[{train@60+train@20}:]", manual_download=True, reference_sizes={"train": 31500},
   notes="TFDS needs the NWPU-RESISC45 .rar (OneDrive link in the TFDS instructions) extracted into the "
         "manual dir.")
_t("diabetic_retinopathy", "specialized", 5, "Retinopathy", "diabetic_retinopathy_detection", "3.*.*",
   'diabetic_retinopathy(config="btgraham-300")', tfds_config="btgraham-300", manual_download=True,
   reference_sizes={"train": 35126, "validation": 10906, "test": 42670},
   notes="Kaggle 'diabetic-retinopathy-detection' files (about 89 GB; check that all train.zip.00* parts are "
         "there, then cat train.zip.* > train.zip and cat test.zip.* > test.zip); the btgraham-300 config "
         "also needs OpenCV (pip install opencv-python-headless).")
# ---- Structured (Clevr-Count, Clevr-Dist, DMLab, KITTI, dSpr-Loc, dSpr-Ori, sNORB-Azim, sNORB-Ele)
_CLEVR_SIZES = {"train": 70000, "validation": 15000, "test": 15000}
_t("clevr_count", "structured", 8, "Clevr-Count", "clevr", "3.*.*", 'clevr(task="count_all")',
   val200=_VAL90, test="validation", label_fn="count:objects/size:-3", reference_sizes=_CLEVR_SIZES)
_t("clevr_dist", "structured", 6, "Clevr-Dist", "clevr", "3.*.*", 'clevr(task="closest_object_distance")',
   val200=_VAL90, test="validation", label_fn="closest:objects/pixel_coords:2:0,8,8.5,9,9.5,10,100",
   reference_sizes=_CLEVR_SIZES)
_t("dmlab", "structured", 6, "DMLab", "dmlab", "2.0.1", "dmlab",
   reference_sizes={"train": 65550, "validation": 22628, "test": 22735})
# VTAB pins kitti 3.1.0; task_adaptation#18: "3.2.0 ... will yield the same data as 3.1.0" (maintainer).
_t("kitti", "structured", 4, "KITTI-Dist", "kitti", "3.1.0", 'kitti(task="closest_vehicle_distance")',
   label_fn="closest:objects/location:2:-100,8,20,999:objects/type<3:1000", version_fallbacks=("3.2.0",),
   reference_sizes={"train": 6347, "validation": 423, "test": 711})
# dSprites: one TFDS split cut 80 / 10 / 10.
_DSPR = dict(val200=_VAL80, test="train[{train@80+train@10}:]", tile_channels=True, scale255=True,
             reference_sizes={"train": 737280})
_t("dsprites_loc", "structured", 16, "dSpr-Loc", "dsprites", "2.*.*",
   'dsprites(predicted_attribute="label_x_position", num_classes=16)', label_fn="bin:label_x_position:32:16",
   **_DSPR)
_t("dsprites_ori", "structured", 16, "dSpr-Ori", "dsprites", "2.*.*",
   'dsprites(predicted_attribute="label_orientation", num_classes=16)', label_fn="bin:label_orientation:40:16",
   **_DSPR)
# sNORB: val200 comes from the first half of the TFDS test split, test is its second half.
_SNORB = dict(val200="test[:200]", test="test[50%:]", tile_channels=True,
              reference_sizes={"train": 24300, "test": 24300})
_t("smallnorb_azi", "structured", 18, "sNORB-Azim", "smallnorb", "2.*.*",
   'smallnorb(predicted_attribute="label_azimuth")', label_fn="key:label_azimuth", **_SNORB)
_t("smallnorb_ele", "structured", 9, "sNORB-Ele", "smallnorb", "2.*.*",
   'smallnorb(predicted_attribute="label_elevation")', label_fn="key:label_elevation", **_SNORB)

# ---- The offline demo: scikit-learn's 8x8 digits, split VTAB-1k style (see embedded.py)
TASKS.add("digits", TaskSpec("digits", "demo", 10, "Digits (sklearn)", train800=None, val200=None, test=None))

#: The 19 VTAB-1k tasks in the column order of the paper's tables.
VTAB_TASKS: list[str] = [n for n in TASKS._items if TASKS.get(n).group in GROUP_NAMES]
#: group -> tasks, in column order.
GROUPS: dict[str, list[str]] = {g: [n for n in VTAB_TASKS if TASKS.get(n).group == g] for g in GROUP_NAMES}


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The task's spec; an unknown name raises :class:`~pyra_bench.registry.UnknownChoiceError` listing all."""
    if isinstance(name, TaskSpec):
        return name
    return TASKS.get(name)


def task_names() -> list[str]:
    """All known task names: the 19 VTAB tasks in paper order, then the demo task(s)."""
    return [*VTAB_TASKS, *(n for n in TASKS._items if n not in VTAB_TASKS)]


def resolve_tasks(spec: str) -> list[str]:
    """``"all"``, a group name, or a comma-separated list of task / group names -> task names (validated)."""
    out: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "all":
            names = list(VTAB_TASKS)
        elif item in GROUPS:
            names = GROUPS[item]
        elif item in TASKS:
            names = [item]
        else:
            raise UnknownChoiceError("task", item, [*task_names(), "all", *GROUP_NAMES])
        out += [n for n in names if n not in out]
    if not out:
        raise ConfigError(f"no task selected by {spec!r}; give task names, group names ({', '.join(GROUP_NAMES)}) "
                          "or 'all'")
    return out


#: Keys of a task config (``conf/task/*.yaml``); ``source`` and ``pyra_lr`` are read by the run.
TASK_CONFIG_KEYS = ("name", "num_classes", "source", "group", "display", "folder", "splits", "pyra_lr")


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a task name: never a path (no '/', '..' first)


def task_spec_from_config(tcfg: Mapping[str, Any]) -> TaskSpec:
    """The :class:`TaskSpec` a task config describes.

    A registered name (the 19 VTAB-1k tasks, ``digits``) gives its spec; ``folder`` / ``splits`` may point
    it elsewhere, and a given ``num_classes`` must agree. Any other name is a folder-format task of its
    own, which needs ``num_classes``; ``folder`` (default: the name) is a folder under ``data_root`` or an
    absolute path, ``splits`` maps the splits it has (``train800val200`` and ``test`` for the final protocol,
    ``train800`` and ``val200`` for tuning) to split-list files in that folder (default ``<split>.txt``),
    each line ``<relative/image/path> <int label>``. ``group`` (default ``custom``) and ``display``
    (default: the name) are how tables group and title it.
    """
    if hasattr(tcfg, "_metadata"):  # an OmegaConf DictConfig
        from omegaconf import OmegaConf

        tcfg = OmegaConf.to_container(tcfg, resolve=True)
    cfg = dict(tcfg)
    unknown = sorted(set(cfg) - set(TASK_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown task config key(s) {', '.join(unknown)}; valid keys: "
                          f"{', '.join(sorted(TASK_CONFIG_KEYS))}")
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a task config needs a name, got {name!r}")
    if not _PLAIN_NAME.fullmatch(name):
        raise ConfigError(f"task.name={name!r} is not a plain name (letters, digits, '.', '_', '-'; no path): a "
                          f"folder task's name is its folder under data_root; to read another folder set "
                          f"task.folder=<path>")
    n = cfg.get("num_classes")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"task {name!r}: num_classes must be a positive int, got {n!r}")
    splits = cfg.get("splits") or {}
    if not isinstance(splits, Mapping):
        raise ConfigError(f"task {name!r}: splits maps split names ({', '.join(SPLITS)}) to list files, got {splits!r}")
    bad = sorted(set(splits) - set(SPLITS))
    if bad:
        raise ConfigError(f"task {name!r}: unknown split(s) {', '.join(bad)} in splits; valid: {', '.join(SPLITS)}")
    if not all(isinstance(v, str) and v for v in splits.values()):
        raise ConfigError(f"task {name!r}: every split file is a file name relative to the task folder, got {splits}")
    folder = cfg.get("folder")
    if folder is not None and not isinstance(folder, str):
        raise ConfigError(f"task {name!r}: folder is a path, got {folder!r}")
    if name in TASKS:
        spec = TASKS.get(name)
        if n is not None and n != spec.num_classes:
            raise ConfigError(f"task {name!r} has {spec.num_classes} classes, but its config says num_classes={n}")
        if folder is None and not splits:
            return spec
        from dataclasses import replace

        return replace(spec, folder=folder if folder is not None else name, split_files=dict(splits),
                       folder_aliases=spec.folder_aliases if folder is None else ())
    if n is None:
        raise ConfigError(f"task {name!r} is not a VTAB-1k task ({', '.join(task_names())}): its config must give "
                          "num_classes (and folder / splits unless they are <data_root>/<name>/<split>.txt)")
    return TaskSpec(name, str(cfg.get("group") or CUSTOM_GROUP), n, str(cfg.get("display") or name),
                    train800=None, val200=None, test=None, folder=folder if folder is not None else name,
                    split_files=dict(splits))


# ---------------------------------------------------------------------------------------------------------
# Split strings
# ---------------------------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TERM = re.compile(r"^\s*(?:(\w+)@(\d+)|(\d+))\s*$")


def resolve_split(template: str, sizes: Mapping[str, int]) -> str:
    """Fill ``{split@P[+split@Q][+N]}`` placeholders from TFDS split sizes (floor, as task_adaptation does).

    >>> resolve_split("train[{train@90}:{train@90+200}]", {"train": 50000})
    'train[45000:45200]'
    """

    def value(m: re.Match) -> str:
        total = 0
        for term in m.group(1).split("+"):
            t = _TERM.match(term)
            if not t:
                raise LabelError(f"bad split placeholder {m.group(0)!r} in {template!r}")
            if t.group(3) is not None:
                total += int(t.group(3))
                continue
            split, pct = t.group(1), int(t.group(2))
            if split not in sizes:
                raise KeyError(f"split string {template!r} needs the size of TFDS split {split!r}; "
                               f"known sizes: {dict(sizes)}")
            total += pct * int(sizes[split]) // 100
        return str(total)

    return _PLACEHOLDER.sub(value, template)


# ---------------------------------------------------------------------------------------------------------
# Label specs
# ---------------------------------------------------------------------------------------------------------
def _get(ex: Mapping[str, Any], path: str) -> Any:
    for part in path.split("/"):
        ex = ex[part]
    return ex


def _closest(ex: Mapping[str, Any], path: str, col: str, thresholds: str, filt: str | None = None,
             default: str | None = None) -> int:
    import numpy as np  # (here: the task table itself is read without it, by listings and --help)

    arr = np.asarray(_get(ex, path), dtype=np.float64)
    values = arr.reshape(len(arr), -1)[:, int(col)] if arr.size else np.zeros(0)
    if filt:
        fpath, k = filt.split("<")
        keep = np.asarray(_get(ex, fpath)).reshape(-1) < float(k)
        values = values[keep]
    if default is not None:
        values = np.append(values, float(default))
    if values.size == 0:
        raise LabelError(f"no object to measure a distance from ({path})")
    thr = np.asarray([float(t) for t in thresholds.split(",")])
    # task_adaptation: label = reduce_max(where(thrs - dist < 0)), i.e. the last threshold below dist
    label = int(np.searchsorted(thr, values.min(), side="left")) - 1
    if label < 0:
        raise LabelError(f"distance {values.min()} is not above the first threshold {thr[0]}")
    return label


def derive_label(spec: str, ex: Mapping[str, Any]) -> int:
    """Apply a label spec (see the module docstring) to one decoded TFDS example (numpy values)."""
    kind, *args = spec.split(":")
    if kind == "key":
        return int(_get(ex, args[0]))
    if kind == "bin":
        key, card, classes = args
        return int(math.floor(float(_get(ex, key)) / (int(card) / int(classes))))
    if kind == "count":
        import numpy as np

        path, offset = args
        return int(len(np.asarray(_get(ex, path)).reshape(-1)) + int(offset))
    if kind == "closest":
        return _closest(ex, *args)
    raise LabelError(f"unknown label spec {spec!r} (kinds: key, bin, count, closest)")
