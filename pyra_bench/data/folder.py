"""The VTAB-1k folder format most PEFT code reads (NOAH / PYRA ``get_vtab1k.py``)::

    <root>/<task>/images/<split>/000123.jpg
    <root>/<task>/{train800,val200,train800val200,test}.txt    lines "images/<split>/000123.jpg <int label>"

Paths in the lists are relative to ``<root>/<task>``. Images are stored at native resolution and read as
RGB. Everything that can be checked without decoding images (folder, split list, label range, listed
files) is checked when the dataset is built, i.e. before any training; an undecodable image raises
:class:`CorruptImageError` naming the file when it is read (or up front with :func:`verify_images`).

Split lists are refused (naming the file and the lines) when they are not UTF-8, list an image twice (it
would count twice in training and in the test accuracy) or name a path outside the task folder (absolute,
or with ``..``). Every listed image must also *resolve* inside the task folder (after symbolic links, the
task folder's own resolved path): a link pointing elsewhere is refused naming it (:class:`UnsafePathError`),
unless it points into ``link_root`` (``data.link_root``: a data folder built of links into one named root). Images are converted to RGB as PIL does, except where PIL's conversion loses the image:

* 16-bit greyscale (PIL modes ``I;16*``, and ``I`` read from a 16-bit PNG) is scaled to 8 bits by keeping
  the high byte (``v >> 8``), as PIL itself reads a 16-bit *colour* PNG (``RGB;16B`` -> ``RGB``); PIL's
  ``convert("RGB")`` would clip every value above 255 to white, leaving a black-and-white image;
* other modes without a fixed 8-bit range (``I`` 32-bit integers, ``F`` floats, ...) are refused by name
  (:class:`UnsupportedImageModeError`);
* images larger than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) are refused by name
  (:class:`ImageTooLargeError`), instead of a raw ``DecompressionBombError`` / warning.

Writing a task folder is kept here too, for every writer (:mod:`pyra_bench.data.prepare`,
:func:`pyra_bench.data.embedded.write_digits_folder`): its status (:func:`existing_task_status`), the staged
folder renamed into place at the end (:func:`staged_task_folder`), split lists and ``meta.json``.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import posixpath
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError, InputError, InputFileNotFoundError
from ..fileio import fsync_dir, make_dir, make_temp_dir
from .tasks import SPLITS, TaskSpec, get_task

#: A task folder made by pyra_bench carries this file (:func:`write_meta`); the format's version.
META_FILE = "meta.json"
FORMAT_VERSION = 1


class DataNotFoundError(InputFileNotFoundError):
    """A VTAB-1k folder, split list or image is missing; the message says how to prepare it."""


class CorruptImageError(InputError, OSError):
    """An image file exists but cannot be decoded; the message names the file."""


class LabelOutOfRangeError(ConfigError):
    """A split list holds a label outside ``[0, num_classes)`` of its task."""


class SplitFormatError(ConfigError):
    """A split list line is not ``<relative/path> <int label>``."""


class SplitEncodingError(SplitFormatError):
    """A split list is not UTF-8 text; the message names the file and the byte offset."""


class DuplicateEntryError(SplitFormatError):
    """A split list names the same image on more than one line."""


class UnsafePathError(SplitFormatError):
    """A split list names a path outside its task folder (absolute, or with ``..``)."""


class UnsupportedImageModeError(CorruptImageError):
    """An image whose PIL mode has no lossless conversion to 8-bit RGB (e.g. 32-bit integer or float)."""


class ImageTooLargeError(CorruptImageError):
    """An image past PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``)."""


def prepare_command(task: str, root: str | os.PathLike) -> str:
    """The shell command that builds ``<root>/<task>`` from TFDS."""
    return f"python -m pyra_bench.data.prepare tasks={task} data_root={root}"


def _how_to_make(spec: TaskSpec, root: str | os.PathLike) -> str:
    if spec.folder is None:  # a registered task, in its standard place
        return f"Prepare it with:  {prepare_command(spec.name, root)}"
    return (f"Task {spec.name!r} comes from its config: set task.folder to the folder holding its split lists "
            "(lines '<relative/image/path> <int label>'; see conf/task/custom_folder_example.yaml)")


def find_task_dir(root: str | os.PathLike, task: str | TaskSpec) -> Path:
    """The folder of ``task`` under ``root``: ``<root>/<folder or name>``, else one of the names the
    community's VTAB-1k archives use (``spec.folder_aliases``, e.g. ``cifar`` for cifar100); an absolute
    ``folder`` (a task from config) is used as it is. :class:`DataNotFoundError` names every place looked at."""
    spec = get_task(task)
    root = Path(root).expanduser()
    own = Path(spec.folder).expanduser() if spec.folder is not None else None
    if own is not None and own.is_absolute():
        candidates = [own]
    else:
        if not root.is_dir():
            kind = "VTAB-1k data root" if spec.folder is None else "data root"
            raise DataNotFoundError(
                f"{kind} not found: {root}\n  {_how_to_make(spec, root)}\n"
                f"  (or point data_root / $VTAB_ROOT at an existing VTAB-1k folder)")
        candidates = [root / (spec.folder or spec.name), *(root / a for a in spec.folder_aliases)]
    for c in candidates:
        if c.is_dir():
            return c
    also = ""
    if len(candidates) > 1:
        also = (f" (also looked for {', '.join(str(c) for c in candidates[1:])}: the name"
                f"{'s' if len(candidates) > 2 else ''} the NOAH/SSF/VPT VTAB-1k archives use)")
    raise DataNotFoundError(f"task folder not found: {candidates[0]}{also}\n  {_how_to_make(spec, root)}")


_LABEL = re.compile(r"[+-]?[0-9]+")  # ASCII digits only (int() would also take "١" or "1_000")


def _rebuild_hint(path: Path, task: str) -> str:
    """How to rebuild the task a split list belongs to (``<root>/<task>/<split>.txt``)."""
    if task == "?":
        return "rebuild the task with python -m pyra_bench.data.prepare ... --overwrite"
    return f"rebuild the task with:  {prepare_command(task, path.parent.parent)} --overwrite"


def _unsafe_path(rel: str) -> str | None:
    """Why ``rel`` leaves the task folder (None if it does not)."""
    win = PureWindowsPath(rel)
    if rel.startswith(("/", "\\")) or win.drive or PurePosixPath(rel).is_absolute():
        return "an absolute path"
    if ".." in PurePosixPath(rel).parts or ".." in win.parts:
        return "a path with '..'"
    return None


def read_split_file(path: str | os.PathLike, num_classes: int | None = None,
                    task: str = "?") -> list[tuple[str, int]]:
    """Parse a split list into ``(relative path, label)`` pairs, validating it.

    Refused, naming the file and the line(s): a file that is not UTF-8 (:class:`SplitEncodingError`, with
    the byte offset; a UTF-8 byte-order mark is accepted), a line that is not ``<relative/path> <int
    label>`` (:class:`SplitFormatError`), a label outside ``[0, num_classes)`` (:class:`LabelOutOfRangeError`),
    a path outside the task folder (:class:`UnsafePathError`), an image listed twice
    (:class:`DuplicateEntryError`). Paths are returned normalised (``./a//b.jpg`` -> ``a/b.jpg``).
    """
    path = Path(path)
    data = path.read_bytes()
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = start + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise SplitEncodingError(
            f"{path} is not UTF-8 text: byte offset {offset} (line {line}) is {data[offset:offset + 1]!r} "
            f"({e.reason}). A split list is UTF-8 lines '<relative/path.jpg> <int label>'; re-save it as UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8) or {_rebuild_hint(path, task)}") from None
    out: list[tuple[str, int]] = []
    first_line: dict[str, tuple[int, int]] = {}  # normalised path -> (line, label) of its first listing
    dups: list[tuple[str, int, int, int, int]] = []  # (path, first line, first label, line, label)
    for n, line in enumerate(re.split(r"\r\n|\r|\n", text), 1):
        line = line.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not _LABEL.fullmatch(parts[1]):
            raise SplitFormatError(
                f"{path}:{n}: expected '<relative/path.jpg> <int label>', got {line!r}")
        rel, label = parts[0], int(parts[1])
        if num_classes is not None and not 0 <= label < num_classes:
            raise LabelOutOfRangeError(
                f"{path}:{n}: label {label} is outside [0, {num_classes}) for task {task!r} "
                f"({num_classes} classes); the folder does not belong to this task or is damaged")
        why = _unsafe_path(rel)
        if why is not None:
            raise UnsafePathError(
                f"{path}:{n}: {rel!r} is {why}: split lists name images by paths relative to the task folder "
                f"{path.parent} (e.g. 'images/test/000000.jpg'), never outside it; fix the line or "
                f"{_rebuild_hint(path, task)}")
        rel = posixpath.normpath(rel)
        if rel in first_line:
            dups.append((rel, *first_line[rel], n, label))
        else:
            first_line[rel] = (n, label)
        out.append((rel, label))
    if dups:
        shown = "; ".join(
            f"{rel!r} on lines {a} and {b}" + (f" (labels {la} and {lb})" if la != lb else "")
            for rel, a, la, b, lb in dups[:5])
        raise DuplicateEntryError(
            f"{path}: {len(dups)} duplicated entr{'y' if len(dups) == 1 else 'ies'}"
            f"{' (first 5 shown)' if len(dups) > 5 else ''}: {shown}. Each image must be listed once (a "
            f"repeated line counts the image twice, in training and in the accuracy); remove the repeated "
            f"lines or {_rebuild_hint(path, task)}")
    return out


# 16-bit greyscale modes, scaled to 8 bits by their high byte (see the module docstring)
_MODES_16BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
# modes PIL converts to RGB without clipping their range
_MODES_8BIT = frozenset({"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LA", "La", "PA"})
_OPEN_LOCK = threading.Lock()


def open_image(path: str | os.PathLike) -> Image.Image:
    """``PIL.Image.open`` with the decompression-bomb warning raised as an error.

    ``warnings.catch_warnings`` changes process-wide state, so opening is serialised; it reads only the
    header, and the decoding (``convert``/``load``) still runs in parallel threads.
    """
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(path)


def to_rgb(img: Image.Image, path: str | os.PathLike = "<image>") -> Image.Image:
    """The fully decoded image as 8-bit RGB (see the module docstring for 16-bit and refused modes)."""
    mode = img.mode
    if mode in _MODES_16BIT or (mode == "I" and img.format == "PNG"):  # PNG stores at most 16 bits per sample
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 0xFFFF):
            raise UnsupportedImageModeError(f"image {path} (mode {mode}) has values outside 0..65535")
        return Image.fromarray((a.astype(np.uint16) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode not in _MODES_8BIT:
        raise UnsupportedImageModeError(
            f"image {path} has PIL mode {mode!r}, which has no fixed 8-bit range: converting it to RGB would "
            "clip its values (a black-and-white image). Save the image as 8-bit RGB or greyscale (or as a "
            "16-bit greyscale PNG, which is scaled to 8 bits)")
    return img.convert("RGB")  # forces a full decode (a truncated JPEG fails here)


class VTABFolderDataset(Dataset):
    """One split of one task in the folder format; items are ``(transform(RGB PIL image), int label)``.

    Args:
        root: the folder holding one sub-folder per task (e.g. ``data/vtab-1k``).
        task: a task name (see :data:`~pyra_bench.data.tasks.VTAB_TASKS`, or ``digits``) or a spec.
        split: ``train800``, ``val200``, ``train800val200`` or ``test``.
        transform: applied to the PIL image (e.g. :func:`~pyra_bench.data.transforms.build_transform`).
        check_files: check at construction that every listed image exists and resolves inside the task
            folder (or ``link_root``).
        link_root: a folder the images may also resolve into (a data folder made of symbolic links).
    """

    def __init__(self, root: str | os.PathLike, task: str | TaskSpec, split: str,
                 transform: Callable[[Image.Image], Any] | None = None, check_files: bool = True,
                 link_root: str | os.PathLike | None = None):
        self.spec = get_task(task)
        self.task = self.spec.name
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid choices: {', '.join(SPLITS)}")
        self.root, self.split, self.transform = Path(root), split, transform
        self.task_dir = find_task_dir(self.root, self.spec)
        list_file = self.task_dir / self.spec.split_file(split)
        if not list_file.is_file():
            present = sorted(p.name for p in self.task_dir.glob("*.txt"))
            fix = (f"Rebuild the task with:  {prepare_command(self.task, self.root)} --overwrite"
                   if self.spec.folder is None else
                   f"Give the {split} list file in the task config (task.splits.{split}: <file in {self.task_dir}>)")
            raise DataNotFoundError(
                f"split list not found: {list_file} (present: {', '.join(present) or 'none'})\n  {fix}")
        entries = read_split_file(list_file, self.spec.num_classes, self.task)
        if not entries:
            raise SplitFormatError(f"{list_file} lists no images")
        self.list_file = list_file
        self.samples: list[tuple[Path, int]] = [(self.task_dir / rel, label) for rel, label in entries]
        self.link_root = Path(link_root).expanduser() if link_root is not None else None
        if check_files:
            self._check_files()
            self._check_inside()

    def _check_inside(self) -> None:
        """Every image resolves (after symbolic links) inside the task folder or ``link_root``."""
        roots = [os.path.realpath(self.task_dir)] + ([os.path.realpath(self.link_root)] if self.link_root else [])
        real_parent: dict[Path, str] = {}
        outside = []
        for path, _ in self.samples:
            if path.parent not in real_parent:
                real_parent[path.parent] = os.path.realpath(path.parent)
            real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_parent[path.parent], path.name)
            if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
                outside.append(f"{path} -> {real}")
        if outside:
            where = f"the task folder {roots[0]}" + (f" or data.link_root={roots[1]}" if self.link_root else "")
            raise UnsafePathError(
                f"{len(outside)} image(s) listed in {self.list_file} resolve outside {where} (symbolic links "
                f"pointing elsewhere), e.g. {'; '.join(outside[:3])}. Images are read only from inside the task "
                f"folder; replace the links by the files, or, for a data folder built of links into one folder, "
                f"set data.link_root=<that folder>")

    def _check_files(self) -> None:
        listing: dict[Path, set[str]] = {}
        missing = []
        for path, _ in self.samples:
            parent = path.parent
            if parent not in listing:
                listing[parent] = set(os.listdir(parent)) if parent.is_dir() else set()
            if path.name not in listing[parent]:
                missing.append(str(path))
        if missing:
            raise DataNotFoundError(
                f"{len(missing)} of {len(self.samples)} images listed in {self.list_file} are missing, e.g. "
                f"{', '.join(missing[:3])}\n  Rebuild the task with:  {prepare_command(self.task, self.root)} "
                f"--overwrite")

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        """The fully decoded 8-bit RGB image (:func:`to_rgb`); :class:`CorruptImageError` (or one of its
        subclasses) names an undecodable, too large or unsupported file."""
        path = self.samples[index][0]
        try:
            with open_image(path) as img:
                return to_rgb(img, path)
        except InputError:
            raise
        except FileNotFoundError as e:
            raise DataNotFoundError(f"image file disappeared: {path}\n  Rebuild the task with:  "
                                    f"{prepare_command(self.task, self.root)} --overwrite") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLargeError(
                f"image {path} is too large to decode safely: {e} (PIL.Image.MAX_IMAGE_PIXELS = "
                f"{Image.MAX_IMAGE_PIXELS}). VTAB-1k images are far smaller, so the file is damaged or not a "
                f"task image: rebuild the task with  {prepare_command(self.task, self.root)} --overwrite  (or, "
                "if such images are intended, raise PIL.Image.MAX_IMAGE_PIXELS)") from None
        except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise CorruptImageError(f"corrupt or undecodable image {path}: {e}") from e

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load_image(index)
        return (self.transform(img) if self.transform is not None else img), self.samples[index][1]

    def __repr__(self) -> str:
        return f"VTABFolderDataset(task={self.task!r}, split={self.split!r}, n={len(self)}, root={str(self.root)!r})"


def verify_images(dataset: VTABFolderDataset, progress: bool = False, max_errors: int = 10, workers: int = 1) -> int:
    """Decode every image of ``dataset`` once; raise :class:`CorruptImageError` listing the bad files.

    Returns the number of images checked. ``workers`` threads decode in parallel (PIL releases the GIL
    while decoding). Used before training (:func:`verify_once`) and by ``prepare --verify``.
    """
    from concurrent.futures import ThreadPoolExecutor

    def check(i: int) -> str | None:
        try:
            dataset.load_image(i)
        except CorruptImageError as e:
            return str(e)
        return None

    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        results = pool.map(check, range(len(dataset)), chunksize=64)
        from ..console import progress as progress_bar

        results = progress_bar(results, enabled=progress, total=len(dataset),
                               desc=f"verify {dataset.task}/{dataset.split}", unit="img")
        bad = [msg for msg in results if msg is not None]
    if bad:
        more = f" (first {max_errors} shown)" if len(bad) > max_errors else ""
        raise CorruptImageError(f"{len(bad)} undecodable image(s) in {dataset.list_file}{more}:\n  "
                                + "\n  ".join(bad[:max_errors])
                                + f"\n  Rebuild the task with:  {prepare_command(dataset.task, dataset.root)} --overwrite")
    return len(dataset)


def _verify_key(dataset: VTABFolderDataset) -> dict[str, Any]:
    st = dataset.list_file.stat()
    return {"list": dataset.list_file.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "images": len(dataset)}


def _stamp_paths(dataset: VTABFolderDataset) -> list[Path]:
    """Where the verification stamp of a split may live: next to the data, else (a read-only data folder)
    in the user cache, keyed by the split list's absolute path."""
    import hashlib

    from ..paths import user_cache_dir as cache_dir

    key = hashlib.sha1(str(dataset.list_file.resolve()).encode()).hexdigest()[:20]
    return [dataset.task_dir / f".verified_{dataset.split}.json", cache_dir() / "verified" / f"{key}.json"]


def verify_once(dataset: VTABFolderDataset, progress: bool = True, workers: int = 1) -> bool:
    """:func:`verify_images`, remembered: a stamp ``<task>/.verified_<split>.json`` (or, when the data folder
    is read-only, one in the user cache) records the split list (size, mtime, count) that decoded cleanly,
    so later runs on the same folder skip the decoding pass. Re-preparing the task rewrites the list and so
    invalidates the stamp. Returns True if it decoded now."""
    import json

    from .. import fileio

    key = _verify_key(dataset)
    stamps = _stamp_paths(dataset)
    for stamp in stamps:
        try:
            if json.loads(stamp.read_text()) == key:
                return False
        except (OSError, ValueError):
            pass
    verify_images(dataset, progress=progress, workers=workers)
    for stamp in stamps:
        try:
            fileio.atomic_write_text(stamp, json.dumps(key, indent=2) + "\n")
            break
        except OSError:  # not writable: try the next place; nowhere -> verify again next time
            continue
    return True


# ---------------------------------------------------------------------------------------------------------
# Writing a task folder: status, staging, split lists, meta.json (data.prepare, embedded.write_digits_folder)
# ---------------------------------------------------------------------------------------------------------
def existing_task_status(task_dir: str | os.PathLike) -> str:
    """``"missing"``, ``"complete"`` (made here: meta.json), ``"foreign"`` (all four split lists but no
    meta.json, e.g. the authors' downloadable export) or ``"incomplete"``."""
    task_dir = Path(task_dir)
    if not task_dir.exists():
        return "missing"
    has_lists = all((task_dir / f"{s}.txt").is_file() for s in SPLITS)
    meta = task_dir / META_FILE
    if meta.is_file():
        try:
            done = json.loads(meta.read_text()).get("complete", False)
        except (OSError, ValueError):
            done = False
        return "complete" if done and has_lists else "incomplete"
    return "foreign" if has_lists else "incomplete"


@contextlib.contextmanager
def staged_task_folder(root: str | os.PathLike, task: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder next to ``<root>/<task>``; rename it to ``<root>/<task>`` on success.

    On any exception (or Ctrl-C) the temporary folder is removed. Leftovers of a killed run
    (``<root>/.<task>.partial-*``) are removed first. The folder is made with the user's umask (``0o777 &
    ~umask``, as ``mkdir`` would; ``tempfile.mkdtemp`` would leave the finished task 0700, unreadable to the
    rest of a lab), and the rename is made durable by an fsync of ``root``.
    """
    root = make_dir(root, "data root")
    final = root / task
    for stale in root.glob(f".{task}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = make_temp_dir(root, prefix=f".{task}.partial-")
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"{final} exists; pass --overwrite to replace it")
            old = root / f".{task}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_split_list(path: str | os.PathLike, entries: Sequence[tuple[str, int]]) -> None:
    """Write ``relative/path label`` lines."""
    Path(path).write_text("".join(f"{rel} {int(label)}\n" for rel, label in entries), encoding="utf-8")


def write_meta(task_dir: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Write ``meta.json`` (marks the folder as complete)."""
    from .. import __version__ as pyra_version

    full = {"format_version": FORMAT_VERSION, "complete": True, **meta, "pyra_bench": pyra_version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(task_dir, META_FILE).write_text(json.dumps(full, indent=2, default=str) + "\n", encoding="utf-8")


def read_meta(task_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The task folder's ``meta.json`` (None when there is none: a folder not made by pyra_bench)."""
    p = Path(task_dir, META_FILE)
    return json.loads(p.read_text()) if p.is_file() else None
