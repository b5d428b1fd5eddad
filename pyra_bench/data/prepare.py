"""Build the VTAB-1k folder format from TensorFlow Datasets, with the official VTAB-1k splits and labels.

    python -m pyra_bench.data.prepare tasks=all data_root=data/vtab-1k [data_dir=~/tensorflow_datasets]
    python -m pyra_bench.data.prepare tasks=diabetic_retinopathy data_root=data/vtab-1k manual_dir=DIR
    python -m pyra_bench.data.prepare tasks=cifar100 data_root=/tmp/smoke mock_examples=2000   # fake data
    python -m pyra_bench.data.prepare tasks=[cifar100,dtd] verify=true      # several tasks: a list

Options (``conf/prepare.yaml``, Hydra ``key=value`` overrides as for train and bench; ``--help`` lists them).
Nothing is written but the task folders (no Hydra output folder or log).

For each task (see :mod:`pyra_bench.data.tasks`) this writes, like NOAH's / PYRA's ``get_vtab1k.py``::

    <data-root>/<task>/images/{train800,val200,train800val200,test}/000000.jpg   (native resolution, RGB)
    <data-root>/<task>/{train800,val200,train800val200,test}.txt                ("images/<split>/000000.jpg 3")
    <data-root>/<task>/meta.json      (TFDS builder + version, resolved split strings, counts, JPEG quality)

Images are PIL JPEGs, quality 75 by default (PIL's default, which the reference export used). The
``train800val200`` images are byte copies of the train800 and val200 files (the same examples, in the
order of VTAB's ``"<train800>+<val200>"`` split string).

Reading TFDS: with TensorFlow installed the TFRecord data is read through ``tf.data`` (``shuffle_files=
False``); without it through ``tfds.data_source`` (random access, needs the ArrayRecord file format, which
this script then asks ``download_and_prepare`` for). Slices are resolved to absolute example ranges with
TFDS's own ``ReadInstruction`` against the builder's split sizes, so both readers select the same examples.

Each task is written into a hidden temporary folder and renamed at the end: an interrupted run leaves no
half-written task folder. A finished task is skipped unless ``overwrite=true``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..errors import InputError
from .tasks import SPLITS, TaskSpec, derive_label, get_task, resolve_tasks

DEFAULT_JPEG_QUALITY = 75


class PrepareError(InputError, RuntimeError):
    """A task cannot be prepared; the message says why and what to do."""


class ManualDownloadError(PrepareError):
    """TFDS cannot download this data set; the user has to fetch the files first."""


# ---------------------------------------------------------------------------------------------------------
# TFDS
# ---------------------------------------------------------------------------------------------------------
def _has_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


class _VersionUnavailable(PrepareError):
    pass


def open_builder(spec: TaskSpec, data_dir: str | os.PathLike | None = None,
                 ensure: Any = None) -> tuple[Any, str | None]:
    """``tfds.builder`` at the task's pinned version, else at its recorded fallbacks.

    ``ensure(builder)`` (e.g. download and prepare) runs inside the loop, so a version this TFDS release
    can open but no longer generate also falls through to the next one. Returns ``(builder, note)``;
    ``note`` says when a fallback version was used.
    """
    import tensorflow_datasets as tfds

    errors = []
    versions = (spec.tfds_version, *spec.version_fallbacks)
    for i, version in enumerate(versions):
        cfg = f"/{spec.tfds_config}" if spec.tfds_config else ""
        name = f"{spec.tfds_name}{cfg}:{version}"
        try:
            builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
        except Exception as e:  # noqa: BLE001 - TFDS raises AssertionError/ValueError/... for a bad version
            errors.append(f"{name}: {str(e).splitlines()[0][:300]}")
            continue
        if ensure is not None:
            try:
                ensure(builder)
            except _VersionUnavailable as e:
                errors.append(f"{name}: {e}")
                continue
        note = None
        if i > 0:
            note = (f"VTAB pins {spec.tfds_builder}, which this TFDS release ({tfds.__version__}) cannot provide "
                    f"({errors[-1] if errors else '?'}); used {builder.info.full_name} instead (the examples or "
                    f"their order may differ from the official VTAB-1k split)")
        return builder, note
    raise PrepareError(f"cannot open a TFDS builder for task {spec.name!r}:\n  " + "\n  ".join(errors))


def split_names_in(template: str) -> set[str]:
    """TFDS split names a split string (template) refers to: ``"train[:800]+test[:200]"`` -> train, test."""
    names = set(re.findall(r"(?:^|\+)\s*([A-Za-z_]\w*)", re.sub(r"\{[^}]*\}", "", template)))
    names |= set(re.findall(r"([A-Za-z_]\w*)@", template))
    return names


def tfds_split_sizes(builder: Any, names: set[str]) -> dict[str, int]:
    """Example counts of the named TFDS splits (from the builder's metadata; else from a data source)."""
    splits = builder.info.splits
    if len(splits):
        missing = sorted(n for n in names if n not in splits)
        if missing:
            raise PrepareError(f"{builder.info.full_name} has no split(s) {missing}; it has {list(splits)}")
        return {n: int(splits[n].num_examples) for n in names}
    # No metadata (e.g. under tfds.testing.mock_data): ask the data sources.
    return {n: len(builder.as_data_source(split=n)) for n in sorted(names)}


def absolute_ranges(split: str, sizes: Mapping[str, int]) -> list[tuple[str, int, int]]:
    """``"train[:800]+test[50%:]"`` -> ``[("train", 0, 800), ("test", 12150, 24300)]`` (TFDS's own rules)."""
    import tensorflow_datasets as tfds

    infos = {k: SimpleNamespace(num_examples=int(v)) for k, v in sizes.items()}
    try:
        instr = tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)
    except (ValueError, AssertionError) as e:
        raise PrepareError(f"split {split!r} does not fit the TFDS split sizes {dict(sizes)}: {e}") from e
    return [(a.splitname, a.from_ or 0, sizes[a.splitname] if a.to is None else a.to) for a in instr]


class ExampleReader:
    """Reads absolute example ranges of TFDS splits as numpy dicts, in TFDS order."""

    def __init__(self, builder: Any, kind: str = "auto"):
        self.builder = builder
        if kind == "auto":
            fmt = str(getattr(builder.info, "file_format", "")).lower()
            kind = "tf.data" if _has_tensorflow() and "array_record" not in fmt else "data_source"
        if kind not in ("tf.data", "data_source"):
            raise ValueError(f"unknown reader {kind!r}")
        self.kind = kind
        self._sources: dict[str, Any] = {}

    def read(self, split: str, start: int, stop: int) -> Iterator[dict[str, Any]]:
        if self.kind == "tf.data":
            import tensorflow_datasets as tfds

            # cycle_length 1: files in order, examples in order (the default interleaves 16 files)
            ds = self.builder.as_dataset(split=f"{split}[{start}:{stop}]", shuffle_files=False,
                                         read_config=tfds.ReadConfig(interleave_cycle_length=1))
            yield from tfds.as_numpy(ds)
            return
        if split not in self._sources:
            try:
                self._sources[split] = self.builder.as_data_source(split=split)
            except Exception as e:  # noqa: BLE001
                raise PrepareError(
                    f"cannot open {self.builder.info.full_name} split {split!r} for random access ({e}).\n"
                    f"  Without TensorFlow, TFDS data must be in the ArrayRecord format; either install "
                    f"tensorflow (pip install tensorflow-cpu) or re-prepare the TFDS data with "
                    f"file_format='array_record'.") from e
        src = self._sources[split]
        for i in range(start, stop):
            yield src[i]


def to_rgb_uint8(image: Any, spec: TaskSpec) -> np.ndarray:
    """A TFDS image as ``(H, W, 3)`` uint8, with the task's VTAB image preprocessing (x255, tiling)."""
    arr = np.asarray(image)
    if spec.scale255:  # dSprites: {0, 1} -> {0, 255}
        arr = np.clip(arr.astype(np.int32) * 255, 0, 255)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise PrepareError(f"task {spec.name!r}: unexpected image shape {arr.shape}")
    return arr.astype(np.uint8, copy=False)


def _save_jpeg(arr: np.ndarray, path: Path, quality: int) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path, format="JPEG", quality=quality)


def _manual_dir_for(builder: Any, manual_dir: str | os.PathLike | None) -> Path:
    if manual_dir is not None:
        return Path(manual_dir).expanduser()
    return Path(str(builder.data_dir_root)) / "downloads" / "manual"


def ensure_tfds_prepared(spec: TaskSpec, builder: Any, data_root: Path, manual_dir: str | os.PathLike | None,
                         download: bool) -> None:
    """Run ``download_and_prepare`` when the TFDS data is not there yet (clear errors first)."""
    try:
        prepared = builder.is_prepared()
    except Exception:  # noqa: BLE001
        prepared = False
    if prepared:
        return
    from .folder import prepare_command

    cmd = prepare_command(spec.name, data_root)
    if not download:
        raise PrepareError(f"TFDS data {builder.info.full_name} not found in {builder.data_dir_root} and "
                           f"download=false was given; drop it (or pass data_dir= where the data is)")
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    mdir = _manual_dir_for(builder, manual_dir)
    if instructions and not (mdir.is_dir() and any(mdir.iterdir())):
        raise ManualDownloadError(
            f"task {spec.name!r} ({builder.info.full_name}) needs a MANUAL download: TFDS cannot fetch it.\n"
            f"  {' '.join(str(instructions).split())}\n"
            + (f"  Note: {spec.notes}\n" if spec.notes else "") +
            f"  Put the files in a folder (e.g. {mdir}), then run:\n"
            f"    {cmd} manual_dir={mdir}" + (f" data_dir={builder.data_dir_root}" if manual_dir is None else ""))
    import tensorflow_datasets as tfds

    file_format = None if _has_tensorflow() else "array_record"
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=str(mdir) if instructions else None),
            file_format=file_format)
    except ValueError as e:
        if "too old" in str(e) or "cannot be generated" in str(e):
            raise _VersionUnavailable(str(e).splitlines()[0]) from e
        raise
    except ImportError as e:
        raise PrepareError(f"building {builder.info.full_name} needs a package TFDS could not import ({e}); "
                           f"most TFDS builders need tensorflow: pip install tensorflow-cpu") from e


# ---------------------------------------------------------------------------------------------------------
# One task
# ---------------------------------------------------------------------------------------------------------
def _write_split(reader: ExampleReader, ranges: list[tuple[str, int, int]], spec: TaskSpec, out: Path,
                 split: str, quality: int, pool: ThreadPoolExecutor, progress: bool) -> list[tuple[str, int]]:
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    total = sum(b - a for _, a, b in ranges)
    entries: list[tuple[str, int]] = []
    pending: deque[Future] = deque()
    from ..console import progress as progress_bar

    bar = progress_bar(enabled=progress, total=total, desc=f"{spec.name}/{split}", unit="img", leave=False)
    try:
        for tfds_split, a, b in ranges:
            for k, ex in enumerate(reader.read(tfds_split, a, b)):
                try:
                    label = derive_label(spec.label_fn, ex)
                except (KeyError, ValueError, IndexError) as e:
                    raise PrepareError(f"{spec.name}: cannot derive the label ({spec.label_fn!r}) of "
                                       f"{tfds_split}[{a + k}]: {e}") from e
                if not 0 <= label < spec.num_classes:
                    raise PrepareError(f"{spec.name}: example {tfds_split}[{a + k}] has label {label}, outside "
                                       f"[0, {spec.num_classes}) (label spec {spec.label_fn!r})")
                rel = f"images/{split}/{len(entries):06d}.jpg"
                img = to_rgb_uint8(ex[spec.image_key], spec)
                pending.append(pool.submit(_save_jpeg, img, out / rel, quality))
                entries.append((rel, label))
                while len(pending) > 64:
                    pending.popleft().result()
                bar.update()
        while pending:
            pending.popleft().result()
    finally:
        bar.close()
    if len(entries) != total:
        raise PrepareError(f"{spec.name}/{split}: read {len(entries)} examples, expected {total}")
    return entries


def prepare_task(
    task: str | TaskSpec,
    data_root: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    verify: bool = False,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    split_sizes: Mapping[str, int] | None = None,
    download: bool = True,
    reader: str = "auto",
    workers: int | None = None,
    progress: bool = True,
    mock: bool = False,
) -> Path:
    """Build ``<data_root>/<task>`` (see the module docstring) and return its path.

    ``split_sizes`` overrides the TFDS split sizes the ``{split@P}`` offsets and ``%`` slices are computed
    from (normally read from the builder). ``mock`` only marks ``meta.json`` as built from fake data.
    """
    from .folder import existing_task_status, staged_task_folder, write_meta, write_split_list  # (torch)

    spec = get_task(task)
    root = Path(data_root).expanduser()
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    status = existing_task_status(root / spec.name)
    if status in ("complete", "foreign") and not overwrite:
        print(f"[prepare] {spec.name}: already prepared at {root / spec.name}"
              + (" (no meta.json: not made by pyra_bench)" if status == "foreign" else "")
              + "; skipping (overwrite=true to rebuild)")
        if verify:
            verify_task(root, spec.name, progress=progress)
        return root / spec.name
    if status == "incomplete" and not overwrite:
        raise PrepareError(f"{root / spec.name} exists but is not a complete VTAB-1k task folder; "
                           f"pass overwrite=true to rebuild it")
    if spec.source == "embedded":
        from .embedded import write_digits_folder

        path = write_digits_folder(root, jpeg_quality=jpeg_quality, overwrite=overwrite)
        if verify:
            verify_task(root, spec.name, progress=progress)
        return path

    t0 = time.time()
    need_data = split_sizes is None and not mock  # under tfds.testing.mock_data there is nothing to download
    builder, version_note = open_builder(
        spec, data_dir, ensure=(lambda b: ensure_tfds_prepared(spec, b, root, manual_dir, download)) if need_data
        else None)
    if version_note:
        print(f"[prepare] WARNING {spec.name}: {version_note}")
    templates = spec.split_templates()
    names = set().union(*(split_names_in(t) for t in templates.values()))
    if split_sizes is None:
        sizes = tfds_split_sizes(builder, names)
    else:
        sizes = {k: int(v) for k, v in split_sizes.items()}
    split_strings = spec.resolve_splits(sizes)
    ranges = {s: absolute_ranges(split_strings[s], sizes) for s in SPLITS}
    if ranges["train800val200"] != ranges["train800"] + ranges["val200"]:  # by construction; guard edits
        raise PrepareError(f"{spec.name}: train800val200 {split_strings['train800val200']!r} is not "
                           f"train800 + val200")
    rd = ExampleReader(builder, reader)
    counts: dict[str, int] = {}
    n_workers = workers or min(4, os.cpu_count() or 1)
    with staged_task_folder(root, spec.name, overwrite=overwrite) as tmp, \
            ThreadPoolExecutor(max_workers=n_workers) as pool:
        written: dict[str, list[tuple[str, int]]] = {}
        for split in ("train800", "val200", "test"):
            written[split] = _write_split(rd, ranges[split], spec, tmp, split, jpeg_quality, pool, progress)
        # train800val200 = the same examples as train800 followed by val200: copy the encoded files.
        (tmp / "images" / "train800val200").mkdir(parents=True)
        union = []
        for j, (rel, label) in enumerate(written["train800"] + written["val200"]):
            new = f"images/train800val200/{j:06d}.jpg"
            shutil.copyfile(tmp / rel, tmp / new)
            union.append((new, label))
        written["train800val200"] = union
        for split in SPLITS:
            write_split_list(tmp / f"{split}.txt", written[split])
            counts[split] = len(written[split])
        import tensorflow_datasets as tfds

        write_meta(tmp, {
            "task": spec.name, "display": spec.display, "group": spec.group, "num_classes": spec.num_classes,
            "vtab_name": spec.vtab_name, "tfds_builder_requested": spec.tfds_builder,
            "tfds_builder": builder.info.full_name, "tfds_version_note": version_note,
            "tensorflow_datasets": tfds.__version__, "reader": rd.kind, "tfds_split_sizes": sizes,
            "split_templates": templates, "split_strings": split_strings,
            "absolute_ranges": {s: [list(r) for r in ranges[s]] for s in SPLITS}, "counts": counts,
            "label_fn": spec.label_fn, "image_key": spec.image_key, "tile_channels": spec.tile_channels,
            "scale255": spec.scale255, "image_format": "jpg", "jpeg_quality": int(jpeg_quality),
            "mock_data": bool(mock), "seconds": round(time.time() - t0, 1),
        })
    print(f"[prepare] {spec.name}: " + ", ".join(f"{s} {counts[s]}" for s in SPLITS)
          + f" -> {root / spec.name} ({time.time() - t0:.0f} s)" + (" [MOCK DATA]" if mock else ""))
    if verify:
        verify_task(root, spec.name, progress=progress)
    return root / spec.name


def verify_task(data_root: str | os.PathLike, task: str, progress: bool = True) -> dict[str, int]:
    """Check a prepared task: every split loads (labels in range, files present), every image decodes,
    counts match ``meta.json``, and train800val200 is exactly train800 followed by val200."""
    from .folder import VTABFolderDataset, read_meta, verify_images

    datasets = {s: VTABFolderDataset(data_root, task, s) for s in SPLITS}
    workers = min(8, os.cpu_count() or 1)
    counts = {s: verify_images(ds, progress=progress, workers=workers) for s, ds in datasets.items()}
    meta = read_meta(Path(data_root) / task)
    if meta and meta.get("counts") and meta["counts"] != counts:
        raise PrepareError(f"{task}: image counts {counts} differ from meta.json {meta['counts']}")
    union = datasets["train800"].samples + datasets["val200"].samples
    tv = datasets["train800val200"].samples
    if len(tv) != len(union) or any(
            a[1] != b[1] or a[0].read_bytes() != b[0].read_bytes() for a, b in zip(tv, union)):
        raise PrepareError(f"{task}: train800val200 is not train800 followed by val200")
    print(f"[prepare] {task}: verified " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    return counts


# ---------------------------------------------------------------------------------------------------------
# Fake TFDS data (tests and --mock-examples): tfds.testing.mock_data with per-split sizes
# ---------------------------------------------------------------------------------------------------------
class _FakeSource:
    """Random examples with a builder's real feature spec (fixed-length sequences, 10x10 dynamic images).

    Images are random 8x8-pixel blocks (cheap to generate and encode; still random, still the feature's
    real shape and dtype).
    """

    def __init__(self, features: Any, n: int, seed: int, max_value: int | None):
        from tensorflow_datasets import features as features_lib
        from tensorflow_datasets.testing.mocking import RandomFakeGenerator

        class _Gen(RandomFakeGenerator):
            def _generate_random_obj(self, feature, tensor_info, rng):
                if not isinstance(feature, features_lib.Image):
                    return super()._generate_random_obj(feature, tensor_info, rng)
                h, w, c = (10 if d is None else d for d in tensor_info.shape)
                hi = self._max_value or 256
                blocks = rng.integers(0, hi, size=(-(-h // 8), -(-w // 8), c)).astype(tensor_info.np_dtype)
                return np.ascontiguousarray(blocks.repeat(8, axis=0).repeat(8, axis=1)[:h, :w])

        self._gen = _Gen(features, n, max_value=max_value, constant_dynamic_shape=True, seed=seed)
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._gen[i]


@contextlib.contextmanager
def mock_tfds(sizes: int | Mapping[str, int], max_value: int | Mapping[str, int] | None = None) -> Iterator[None]:
    """``tfds.testing.mock_data`` whose data sources have per-split sizes.

    ``sizes``: one number for every split, or ``{"train": 2000, "smallnorb/test": 400, "*": 50}`` (keys
    ``"<builder>/<split>"`` first, then ``"<split>"``, then ``"*"``).

    Examples are random but keep each data set's real features; different splits (and builders) yield
    different examples, so a wrong split or offset is detectable. ``max_value`` caps integer tensors
    (e.g. ``{"dsprites": 2}`` for {0, 1} images); class labels always stay below their class count.
    Needs no TensorFlow.
    """
    import zlib

    import tensorflow_datasets as tfds

    def as_data_source(builder, split, decoders=None, deserialize_method=None, **kwargs):
        n = sizes if isinstance(sizes, int) else sizes.get(f"{builder.name}/{split}", sizes.get(split, sizes.get("*")))
        if not n:
            raise ValueError(f"mock_tfds: no size for split {split!r} of {builder.name}")
        mv = max_value.get(builder.name) if isinstance(max_value, Mapping) else max_value
        seed = zlib.crc32(f"{builder.name}/{split}".encode())
        return _FakeSource(builder.info.features, int(n), seed, mv)

    absl, quiet = logging.getLogger("absl"), _DropNoFilesLine()
    absl.addFilter(quiet)
    try:
        with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source):
            yield
    finally:
        absl.removeFilter(quiet)


class _DropNoFilesLine(logging.Filter):
    """TFDS logs (absl, INFO) ``Failed to load dataset "<name>" ... from files: Could not find dataset files
    ... generated in: ['/tmp/non-existing/tfds/data_dir/']`` for every mocked builder: mock data has no
    files by design (TFDS builds it from the code next), so under :func:`mock_tfds` the line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load %s from files")


# ---------------------------------------------------------------------------------------------------------
# CLI: a Hydra app (conf/prepare.yaml), key=value overrides as for train and bench
# ---------------------------------------------------------------------------------------------------------
READERS = ("auto", "tf.data", "data_source")
PROG = "python -m pyra_bench.data.prepare"


def _task_spec(tasks: Any) -> str:
    """``tasks`` as given: a string (``all``, a group, ``cifar100``) or a list (``tasks=[cifar100,dtd]``)."""
    if isinstance(tasks, (list, tuple)) or (hasattr(tasks, "__iter__") and not isinstance(tasks, str)):
        return ",".join(str(t) for t in tasks)
    return str(tasks)


def run(cfg: Any) -> int:
    """Prepare the configured tasks (``cfg``: the composed ``conf/prepare.yaml``); the exit status: 0, 1 when
    a task failed (the others are still prepared unless ``fail_fast``), 2 for bad input."""
    from ..checks import check_prepare_config
    from ..errors import InputError

    try:
        check_prepare_config(cfg)  # every value, before any folder is made
    except InputError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        tasks = resolve_tasks(_task_spec(cfg.tasks))
        if cfg.reader not in READERS:
            raise ValueError(f"unknown reader {cfg.reader!r}; valid choices: {', '.join(READERS)}")
        if cfg.get("mock_examples") is not None and int(cfg.mock_examples) < 1:
            raise ValueError(f"mock_examples must be a positive number of examples, got {cfg.mock_examples}")
    except (KeyError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    mock = cfg.get("mock_examples")
    mock_ctx = mock_tfds(int(mock), max_value={"dsprites": 2}) if mock else contextlib.nullcontext()
    failed: dict[str, str] = {}
    with mock_ctx:
        for task in tasks:
            try:
                prepare_task(task, cfg.data_root, data_dir=cfg.data_dir, manual_dir=cfg.manual_dir,
                             overwrite=bool(cfg.overwrite), verify=bool(cfg.verify), jpeg_quality=int(cfg.jpeg_quality),
                             download=bool(cfg.download), reader=str(cfg.reader), workers=cfg.workers,
                             progress=bool(cfg.progress), mock=bool(mock))
            except (PrepareError, OSError, ValueError) as e:
                failed[task] = str(e)
                print(f"[prepare] FAILED {task}: {e}", file=sys.stderr)
                if cfg.fail_fast:
                    break
    done = [t for t in tasks if t not in failed]
    print(f"[prepare] done: {len(done)}/{len(tasks)} task(s) ready in {cfg.data_root}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _hydra_app():
    from ..cli import hydra_app
    from ..paths import CONF_DIR

    @hydra_app(config_path=str(CONF_DIR), config_name="prepare")  # hydra.main; --help alone: info.fast_help
    def app(cfg) -> None:
        code = run(cfg)
        if code:
            sys.exit(code)

    return app


def compose_config(overrides: Sequence[str] = ()) -> Any:
    """``conf/prepare.yaml`` with Hydra overrides, composed without Hydra's command line (scripts, tests)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from ..paths import CONF_DIR

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="prepare"):
            return compose("prepare", overrides=list(overrides))
    finally:
        restore_gh_from_backup(backup)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pyra_bench.data.prepare [key=value ...]`` (``--help`` lists the options). ``argv``: the
    overrides as a list, run without Hydra's command line, returning the exit status."""
    if argv is None:
        _hydra_app()()  # parses sys.argv; a non-zero status exits through SystemExit
        return 0
    return run(compose_config(argv))


if __name__ == "__main__":
    sys.exit(main())
