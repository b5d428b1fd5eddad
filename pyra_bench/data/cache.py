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
touching an image rebuilds it. It is written to a temporary file and renamed when complete, under a file
lock so that parallel processes (DDP ranks, sweep jobs) build it once. ``max_gb`` bounds the whole cache
folder: the least recently used entries are evicted to make room; a split larger than the limit on its
own, or one the disk has no room for, is not cached (the caller falls back to the JPEG path).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .folder import VTABFolderDataset
from .transforms import build_resize, to_uint8_chw

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
DEFAULT_MAX_GB = 64.0
_DISK_MARGIN = 2**30  # leave at least 1 GiB free on the cache's disk


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


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (no-op where the file system offers none)."""
    with open(path, "a+") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        yield


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


def _make_room(root: Path, need: int, max_bytes: int, keep: Path) -> None:
    entries = [e for e in _entries(root) if e[1] != keep]
    total = sum(n for _, _, n in entries)
    for _, p, n in entries:
        if total + need <= max_bytes:
            break
        for q in (p, p.with_suffix(".json"), p.with_suffix(".lock")):
            with contextlib.suppress(OSError):
                q.unlink()
        total -= n
        log.info("input cache: evicted %s (%.2f GB, least recently used) to stay within %.1f GB",
                 p.name, n / 1e9, max_bytes / 1e9)


def _write_images(dataset: VTABFolderDataset, path: Path, image_size: int, interpolation: str, workers: int,
                  progress: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    resize = build_resize(image_size, interpolation)
    n = len(dataset)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, image_size, image_size))

    def fill(i: int) -> None:  # PIL releases the GIL while decoding and resizing
        arr[i] = to_uint8_chw(resize(dataset.load_image(i)))

    with ThreadPoolExecutor(max(1, int(workers))) as pool:
        done = pool.map(fill, range(n))
        from ..console import progress as progress_bar

        done = progress_bar(done, enabled=progress, total=n, desc=f"cache {dataset.task}/{dataset.split}", unit="img")
        for _ in done:
            pass
    arr.flush()


def _build(dataset: VTABFolderDataset, final: Path, image_size: int, interpolation: str, workers: int,
           progress: bool) -> None:
    """Write the entry to a temporary file, then rename it: a reader sees a complete file or none."""
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    try:
        _write_images(dataset, tmp, image_size, interpolation, workers, progress)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def ensure_cached(dataset: VTABFolderDataset, image_size: int, interpolation: str = "bicubic",
                  cache_dir: str | os.PathLike | None = None, max_gb: float = DEFAULT_MAX_GB, workers: int = 1,
                  progress: bool | None = None) -> CacheEntry | None:
    """The cache entry of ``dataset`` at ``image_size``, built now if missing (decoding every image with
    ``workers`` threads; an undecodable image raises :class:`~pyra_bench.data.folder.CorruptImageError`
    naming it). Returns None, with a warning, when the split cannot be cached (larger than ``max_gb``, no
    room on the disk, or the cache folder is not writable): read it from the JPEG files then."""
    from ..records import atomic_write_json

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
    key = cache_key(dataset, image_size, interpolation)
    final = root / f"{key}.npy"
    meta = final.with_suffix(".json")
    built = False
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / f"{key}.lock"):
            if not final.exists():
                _make_room(root, need, max_bytes, final)
                free = shutil.disk_usage(root).free
                if free < need + _DISK_MARGIN:
                    log.warning("input cache: %s needs %.2f GB but %s has %.2f GB free; reading its JPEG files "
                                "instead", name, need / 1e9, root, free / 1e9)
                    return None
                _build(dataset, final, image_size, interpolation, workers,
                       len(dataset) >= 5000 if progress is None else progress)
                built = True
                atomic_write_json(meta, {"task": dataset.task, "split": dataset.split, "images": len(dataset),
                                         "image_size": image_size, "interpolation": interpolation,
                                         "list_file": str(dataset.list_file.resolve()), "bytes": final.stat().st_size,
                                         "format": CACHE_FORMAT})
            else:
                with contextlib.suppress(OSError):
                    os.utime(meta if meta.exists() else final)  # last use, for the LRU eviction
    except PermissionError as e:
        log.warning("input cache: %s is not writable (%s); reading %s from its JPEG files", root, e, name)
        return None
    entry = CacheEntry(final, len(dataset), image_size, final.stat().st_size, built, time.perf_counter() - t0)
    log.info("input cache: %s, %d images at %dx%d, %.3f GB, %s: %s", name, entry.num_images, image_size,
             image_size, entry.nbytes / 1e9, f"built in {entry.seconds:.1f} s" if built else "reused", final)
    return entry
