"""Input cache: a split's images decoded and resized once, kept as uint8 arrays in a memory-mapped file.

Every epoch of a VTAB-1k run would otherwise decode and bicubic-resize the same 1,000 training images
again, and every evaluation the whole test split; the resize dominates (about 1,100 small or 550 256-px
images per second per core). The first pass over a split stores what the PIL path computes before
``ToTensor`` -- the RGB image directly resized to the backbone's size
(:func:`~pyra_bench.data.transforms.build_resize`) -- as one ``(N, 3, S, S)`` uint8 ``.npy`` file; later
epochs and evaluations read it back through a memory map, and the normalisation runs on the device
(:class:`~pyra_bench.data.transforms.Uint8Normalizer`), so a cached batch, once normalised, is
bit-identical to the PIL path's.

Location ``cache_dir`` (default ``$PYRA_INPUT_CACHE``, else ``<user cache>/inputs``:
``~/.cache/pyra_bench/inputs`` or ``$PYRA_BENCH_CACHE/inputs``). An entry is keyed by the split list's bytes, the image size, the
interpolation, Pillow's version and the size and mtime of every listed image, so re-preparing a task or
touching an image rebuilds it. It is written to a temporary file (``.<key>.<pid>.<random>.building``) and
renamed when complete, under a file lock (``filelock``: ``flock``) so that parallel processes (DDP ranks,
sweep jobs) build it once. ``max_gb`` bounds the whole cache folder: the least recently used entries are
evicted to make room; a split larger than the limit on its own, or one the disk has no room for, is not
cached (the caller falls back to the JPEG path).

A shared or copied cache is not trusted blindly: each entry's ``.json`` holds its size and an xxh3 checksum,
checked the first time a process opens the entry (with its dtype and shape); an entry that does not match
(bit rot, a truncated copy, an object array) is one warning and is rebuilt. Any OS error while building
or opening an entry -- a read-only or full file system, a quota, the file-size limit, a cache folder that
is a file -- is one warning naming the folder and the error, and the split is read from its JPEG files.
The temporary file of a builder that died (SIGKILL, a crashed node: its lock is free) is removed, and
counted, by the next process that uses the cache; a live builder's counts against ``max_gb``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError
from ..fileio import file_xxh3
from .folder import VTABFolderDataset
from .transforms import build_resize, to_uint8_chw

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the entry's .json carries its size and xxh3 checksum
DEFAULT_MAX_GB = 64.0
_DISK_MARGIN = 2**30  # leave at least 1 GiB free on the cache's disk
_TEMP_SUFFIX = ".building"
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) of entries this process has checked
_WARNED: set[tuple[str, str]] = set()  # (cache folder, error) this process has warned about


def default_cache_dir() -> Path:
    """``$PYRA_INPUT_CACHE``, else ``<user cache>/inputs`` (``$PYRA_BENCH_CACHE/inputs`` or
    ``~/.cache/pyra_bench/inputs``)."""
    from ..paths import user_cache_dir as cache_dir

    env = os.environ.get("PYRA_INPUT_CACHE")
    return Path(env).expanduser() if env else cache_dir() / "inputs"


def cache_key(dataset: VTABFolderDataset, image_size: int, interpolation: str = "bicubic") -> str:
    """Content key of a split's cache entry (see the module docstring for what it covers)."""
    import PIL

    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "task": dataset.task, "split": dataset.split,
                         "image_size": int(image_size), "interpolation": interpolation,
                         "pillow": PIL.__version__}, sort_keys=True).encode())
    h.update(dataset.list_file.read_bytes())
    for path, _ in dataset.samples:
        st = os.stat(path)
        h.update(struct.pack("<qq", st.st_size, st.st_mtime_ns))
    return h.hexdigest()[:32]


@dataclass
class CacheEntry:
    """One cached split: ``path`` (the ``.npy``), its shape and size, and whether this call built it."""

    path: Path
    num_images: int
    image_size: int
    nbytes: int
    built: bool
    seconds: float

    def describe(self) -> dict:
        return {"path": str(self.path), "images": self.num_images, "image_size": self.image_size,
                "bytes": self.nbytes, "built_now": self.built}


class CachedImages(Dataset):
    """A cached split: items are ``(uint8 tensor (3, S, S), int label)``, read from the memory map.

    The map is opened lazily in each process (it is not pickled into loader workers)."""

    def __init__(self, path: str | os.PathLike, targets: Sequence[int], name: str = ""):
        self.path, self.name = Path(path), name
        self._targets = np.asarray(targets, dtype=np.int64)
        self._arr: np.ndarray | None = None
        if self._array().shape[0] != len(self._targets):
            raise ValueError(f"{self.path} holds {self._array().shape[0]} images, expected {len(self._targets)}")

    def _array(self) -> np.ndarray:
        if self._arr is None:
            self._arr = np.load(self.path, mmap_mode="r")
        return self._arr

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arr": None}

    @property
    def targets(self) -> list[int]:
        return self._targets.tolist()

    def __len__(self) -> int:
        return len(self._targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self._array()[index])), int(self._targets[index])

    def __repr__(self) -> str:
        return f"CachedImages({self.name or self.path.name}, n={len(self)}, shape={self._array().shape[1:]})"


def _lock(root: Path, key: str, timeout: float = -1):
    from filelock import FileLock

    return FileLock(str(root / f"{key}.lock"), timeout=timeout, is_singleton=False)


def _temps(root: Path) -> list[tuple[str, Path]]:
    """(key, path) of every builder's temporary file (``.<key>.<pid>.<random>.building``)."""
    return [(p.name[1:].split(".", 1)[0], p) for p in root.glob(f".*{_TEMP_SUFFIX}")]


def _remove_dead_temps(root: Path, own_key: str | None = None) -> int:
    """Remove the temporary files of builders that died (their key's lock is free; ``own_key``: held by this
    process, so any temporary file of it is a dead builder's); return the bytes of live builders' files."""
    from filelock import Timeout

    live, dead, freed = 0, 0, 0
    for key, path in _temps(root):
        try:
            size = path.stat().st_size
            if key != own_key:
                lock = _lock(root, key, timeout=0)
                try:
                    lock.acquire()
                except Timeout:
                    live += size  # a builder at work: counted against the limit, not removed
                    continue
                try:
                    path.unlink()
                finally:
                    lock.release()
            else:
                path.unlink()
        except OSError:
            continue
        dead, freed = dead + 1, freed + size
    if dead:
        log.warning("input cache: removed %d temporary file(s) of builders that died (%.3f GB) in %s", dead,
                    freed / 1e9, root)
    return live


def _entries(root: Path) -> list[tuple[float, Path, int]]:
    """(last use, data file, bytes) of every complete entry; last use = mtime of its ``.json``."""
    out = []
    for p in root.glob("*.npy"):
        meta = p.with_suffix(".json")
        try:
            used = meta.stat().st_mtime if meta.exists() else p.stat().st_mtime
            out.append((used, p, p.stat().st_size))
        except OSError:
            continue
    return sorted(out)


def _remove_entry(path: Path) -> None:
    for q in (path, path.with_suffix(".json")):
        with contextlib.suppress(FileNotFoundError):
            q.unlink()


def _make_room(root: Path, need: int, max_bytes: int, keep: Path, building: int = 0) -> None:
    """Evict least recently used entries until ``need`` more bytes fit (``building``: live builders' files)."""
    entries = [e for e in _entries(root) if e[1] != keep]
    total = building + sum(n for _, _, n in entries)
    for _, p, n in entries:
        if total + need <= max_bytes:
            break
        _remove_entry(p)
        with contextlib.suppress(OSError):
            p.with_suffix(".lock").unlink()
        total -= n
        log.info("input cache: evicted %s (%.2f GB, least recently used) to stay within %.1f GB",
                 p.name, n / 1e9, max_bytes / 1e9)


def _write_images(dataset: VTABFolderDataset, path: Path, image_size: int, interpolation: str, workers: int,
                  progress: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    resize = build_resize(image_size, interpolation)
    n = len(dataset)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, image_size, image_size))
    _allocate(path)

    def fill(i: int) -> None:  # PIL releases the GIL while decoding and resizing
        arr[i] = to_uint8_chw(resize(dataset.load_image(i)))

    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        done = pool.map(fill, range(n))
        from ..console import progress as progress_bar

        done = progress_bar(done, enabled=progress, total=n, desc=f"cache {dataset.task}/{dataset.split}", unit="img")
        for _ in done:
            pass
    arr.flush()


def _allocate(path: Path) -> None:
    """Reserve the file's blocks now: a write into a memory map that the file system has no room for is a
    SIGBUS that kills the process, where this is an ``OSError`` (ENOSPC, EDQUOT) the caller falls back on."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    with open(path, "r+b") as f:
        try:
            fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system without it: written as it comes
                return
            raise


def _build(dataset: VTABFolderDataset, final: Path, image_size: int, interpolation: str, workers: int,
           progress: bool) -> str:
    """Write the entry to a temporary file, then rename it: a reader sees a complete file or none. Returns its
    checksum."""
    tmp = final.with_name(f".{final.stem}.{os.getpid()}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    try:
        _write_images(dataset, tmp, image_size, interpolation, workers, progress)
        digest = file_xxh3(tmp)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return digest


def _damage(final: Path, shape: tuple[int, ...]) -> str | None:
    """Why the entry ``final`` cannot be served (None when it is sound): its ``.json`` is missing or of another
    format, its size or checksum differs from what the ``.json`` says, or it is not a uint8 array of ``shape``.
    The checksum is read once per process and file (size, mtime)."""
    meta_path = final.with_suffix(".json")
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return f"{meta_path.name} is missing"
    except ValueError as e:
        return f"{meta_path.name} is not readable JSON ({e})"
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or not meta.get("xxh3_64"):
        return f"{meta_path.name} is not a format-{CACHE_FORMAT} entry description"
    st = final.stat()
    if st.st_size != meta.get("bytes"):
        return f"it has {st.st_size} bytes, {meta.get('bytes')} were written"
    stamp = (str(final), st.st_size, st.st_mtime_ns)
    if stamp not in _VERIFIED:
        if file_xxh3(final) != meta["xxh3_64"]:
            return "its checksum does not match (the file changed after it was written)"
        try:
            arr = np.load(final, mmap_mode="r")
        except ValueError as e:  # e.g. an object array: not memory-mappable
            return f"it is not a memory-mappable array ({e})"
        if arr.dtype != np.uint8 or arr.shape != shape:
            return f"it holds {arr.dtype} {arr.shape}, not uint8 {shape}"
        _VERIFIED.add(stamp)
    return None


def ensure_cached(dataset: VTABFolderDataset, image_size: int, interpolation: str = "bicubic",
                  cache_dir: str | os.PathLike | None = None, max_gb: float = DEFAULT_MAX_GB, workers: int = 1,
                  progress: bool | None = None) -> CacheEntry | None:
    """The cache entry of ``dataset`` at ``image_size``, verified, built now if missing or damaged (decoding
    every image with ``workers`` threads; an undecodable image raises
    :class:`~pyra_bench.data.folder.CorruptImageError` naming it). Returns None, with one warning, when the
    split cannot be cached (larger than ``max_gb``, no room on the disk, any OS error while building or
    opening the entry): read it from the JPEG files then."""
    image_size = int(image_size)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"{dataset.task}/{dataset.split}"
    need = len(dataset) * 3 * image_size**2 + 128
    max_bytes = int(float(max_gb) * 1e9)
    if need > max_bytes:
        log.warning("input cache: %s at %d px needs %.2f GB, over the limit of %.1f GB (cache_max_gb); "
                    "reading its JPEG files instead", name, image_size, need / 1e9, max_gb)
        return None
    t0 = time.perf_counter()
    try:
        key = cache_key(dataset, image_size, interpolation)
        final = root / f"{key}.npy"
        shape = (len(dataset), 3, image_size, image_size)
        built = _open_or_build(dataset, root, key, final, shape, need, max_bytes, interpolation, workers, progress)
    except InputError:
        raise  # an undecodable or missing image: the data's problem, named
    except OSError as e:  # read-only, full, over quota, past the file-size limit, a file where the folder is ...
        code = errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__
        _warn_once(root, code, "input cache: cannot use %s (%s: %s); reading %s from its JPEG files", root, code,
                   e.strerror or e, name)
        return None
    if built is None:
        return None
    entry = CacheEntry(final, len(dataset), image_size, final.stat().st_size, built, time.perf_counter() - t0)
    log.info("input cache: %s, %d images at %dx%d, %.3f GB, %s: %s", name, entry.num_images, image_size,
             image_size, entry.nbytes / 1e9, f"built in {entry.seconds:.1f} s" if built else "reused", final)
    return entry


def _warn_once(root: Path, kind: str, msg: str, *args) -> None:
    """One warning per cache folder and kind of problem in a process; the other splits' at info level."""
    once = (str(root), kind) not in _WARNED
    _WARNED.add((str(root), kind))
    log.log(logging.WARNING if once else logging.INFO, msg, *args)


def _open_or_build(dataset: VTABFolderDataset, root: Path, key: str, final: Path, shape: tuple[int, ...], need: int,
                   max_bytes: int, interpolation: str, workers: int, progress: bool | None) -> bool | None:
    """Serve a sound entry (False: reused), else build it under its lock (True); None: no room on the disk."""
    from ..records import atomic_write_json

    name = f"{dataset.task}/{dataset.split}"
    if final.exists():
        why = _damage(final, shape)
        if why is None:
            with contextlib.suppress(OSError):  # last use, for the LRU eviction (a read-only cache: not needed)
                os.utime(final.with_suffix(".json"))
            return False
        log.warning("input cache: the entry %s of %s is damaged (%s); it is rebuilt", final, name, why)
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root, key):
        if final.exists() and _damage(final, shape) is None:  # built by another process meanwhile
            return False
        _remove_entry(final)
        building = _remove_dead_temps(root, own_key=key)
        _make_room(root, need, max_bytes, final, building)
        free = shutil.disk_usage(root).free
        if free < need + _DISK_MARGIN:
            _warn_once(root, "no room", "input cache: %s needs %.3g GB but %s has %.3g GB free (and keeps %.0f GB "
                       "free); reading its JPEG files instead", name, need / 1e9, root, free / 1e9, _DISK_MARGIN / 2**30)
            return None
        digest = _build(dataset, final, image_size=shape[-1], interpolation=interpolation, workers=workers,
                        progress=len(dataset) >= 5000 if progress is None else progress)
        atomic_write_json(final.with_suffix(".json"), {
            "task": dataset.task, "split": dataset.split, "images": len(dataset), "image_size": shape[-1],
            "interpolation": interpolation, "list_file": str(dataset.list_file.resolve()),
            "bytes": final.stat().st_size, "xxh3_64": digest, "format": CACHE_FORMAT})
        _VERIFIED.add((str(final), final.stat().st_size, final.stat().st_mtime_ns))
    return True
