"""Lightning DataModule for one VTAB-1k task (folder format) or the embedded ``digits`` task.

The authors' protocol (``PYRA: lib/datasets.py``): train on ``train800val200`` (1,000 images; shuffled,
``drop_last=True``), evaluate top-1 on the full ``test`` split; tuning runs train on ``train800`` and
evaluate on ``val200``. Same transform for both (direct bicubic resize + normalise, no augmentation).

Folder data goes through the input cache by default (:mod:`pyra_bench.data.cache`): each split is decoded
and resized once into a memory-mapped uint8 file, the loaders deliver uint8 batches, and the
normalisation runs on the device in :meth:`VTABDataModule.on_after_batch_transfer` (bit-identical to the
PIL path). Code that iterates the loaders itself normalises with :meth:`VTABDataModule.normalize`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from .folder import VTABFolderDataset, find_task_dir, prepare_command, verify_once
from .tasks import SPLITS, TaskSpec, get_task
from .transforms import Uint8Normalizer, build_transform, get_normalization

log = logging.getLogger(__name__)

SOURCES = ("folder", "embedded")
DATA_FORMATS = {"folder": "jpeg_folder", "embedded": "embedded_sklearn_digits"}


class VTABDataModule(L.LightningDataModule):
    """Loaders for one task. Construction validates the task, splits, normalisation and (for
    ``source="folder"``) the prepared folder, so bad inputs fail before any model is built.

    Args:
        task: a VTAB-1k task name, ``digits``, or a :class:`~pyra_bench.data.tasks.TaskSpec` (e.g. a folder
            task from its config: :func:`~pyra_bench.data.tasks.task_spec_from_config`).
        data_root: folder with one sub-folder per task (``source="folder"``).
        batch_size / eval_batch_size: training / evaluation batch size (eval default: 4 x batch_size).
        num_workers: loader processes (default: min(8, CPUs) for JPEG folders, 0 for in-memory data).
        image_size, normalization, interpolation: the transform (see :func:`build_transform`).
        train_split: split trained on (``train800val200``; ``train800`` for tuning).
        eval_split: split evaluated and reported (``test``; ``val200`` for tuning).
        val_split: split of Lightning's validation loop (default ``eval_split``: the VTAB protocol evaluates
            the test split every few epochs); ``test_dataloader`` always serves ``eval_split``.
        source: ``"folder"`` (JPEG folder) or ``"embedded"`` (only ``digits``, no data root needed).
        pin_memory: default: when CUDA is available.
        seed: seeds the training shuffle order.
        verify_images: decode every image of the used splits before training (``source="folder"``), so a
            corrupt file fails the run up front, naming the file; remembered per split list
            (:func:`~pyra_bench.data.folder.verify_once`), so only the first run on a folder pays for it.
        cache: serve folder splits from the input cache (default: on for folder data; in-memory embedded
            data needs none). The loaders then yield uint8 images, normalised on the device.
        cache_dir: where the cache lives (default ``$PYRA_INPUT_CACHE``, else ``~/.cache/pyra_bench/inputs``
            or ``$PYRA_BENCH_CACHE/inputs``).
        cache_max_gb: size limit of the whole cache folder (least recently used entries are evicted; a
            split over the limit on its own is read from its JPEG files).
        link_root: a folder the images may resolve into besides the task folder (a data folder built of
            symbolic links; default: none, every image resolves inside its task folder).
    """

    def __init__(
        self,
        task: str | TaskSpec = "digits",
        data_root: str | os.PathLike | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | None = None,
        image_size: int = 224,
        normalization: str = "imagenet",
        train_split: str = "train800val200",
        eval_split: str = "test",
        val_split: str | None = None,
        source: str = "folder",
        pin_memory: bool | None = None,
        seed: int = 0,
        interpolation: str = "bicubic",
        verify_images: bool = False,
        cache: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        cache_max_gb: float | None = None,
        link_root: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.spec = get_task(task)
        self.task = self.spec.name
        if source not in SOURCES:
            raise ConfigError(f"unknown data source {source!r}; valid choices: {', '.join(SOURCES)}")
        if source == "embedded" and self.spec.source != "embedded":
            raise ConfigError(f"task {self.task!r} is not embedded (only 'digits' is); use source='folder' and "
                             f"prepare it with: {prepare_command(self.task, '<dir>')}")
        for name, split in (("train_split", train_split), ("eval_split", eval_split), ("val_split", val_split)):
            if split is not None and split not in SPLITS:
                raise ConfigError(f"unknown {name} {split!r}; valid choices: {', '.join(SPLITS)}")
        if int(batch_size) <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        get_normalization(normalization)  # unknown preset -> error listing the valid ones
        if source == "folder" and data_root is None:
            raise ConfigError(f"source='folder' needs data_root (prepare with: {prepare_command(self.task, '<dir>')})")
        self.source = source
        self.data_root = Path(data_root).expanduser() if data_root is not None else None
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or 4 * self.batch_size)
        self.num_workers = (min(8, os.cpu_count() or 1) if source == "folder" else 0) if num_workers is None \
            else int(num_workers)
        self.image_size, self.normalization, self.interpolation = int(image_size), normalization, interpolation
        self.train_split, self.eval_split = train_split, eval_split
        self.val_split = val_split or eval_split
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.seed = int(seed)
        self._datasets: dict[str, Dataset] = {}
        self.link_root = link_root
        self._init_cache(cache, cache_dir, cache_max_gb)
        if source == "folder":  # fail fast: folder, split lists, labels, listed images (no decoding)
            for split in dict.fromkeys((self.train_split, self.eval_split, self.val_split)):
                self._dataset(split)
            self._warn_if_mock()
            if verify_images:
                self.verify()

    def verify(self, progress: bool = True) -> None:
        """Decode every image of the used splits once (a folder source; remembered per split list), so a
        corrupt file raises :class:`~pyra_bench.data.folder.CorruptImageError` now rather than mid-training."""
        if self.source != "folder":
            return
        for split in dict.fromkeys((self.train_split, self.eval_split, self.val_split)):
            verify_once(self._dataset(split), progress=progress, workers=max(1, self.num_workers))

    # -- record ----------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    @property
    def data_format(self) -> str:
        """How images are read, for the run record: ``jpeg_folder`` or ``embedded_sklearn_digits``."""
        return DATA_FORMATS[self.source]

    def describe(self) -> dict[str, Any]:
        """Data provenance for a run record."""
        info: dict[str, Any] = {
            "task": self.task, "group": self.spec.group, "num_classes": self.num_classes,
            "data_format": self.data_format, "train_split": self.train_split, "eval_split": self.eval_split,
            "image_size": self.image_size, "normalization": self.normalization,
            "interpolation": self.interpolation,
            "sizes": {s: len(self._dataset(s)) for s in dict.fromkeys((self.train_split, self.eval_split))},
            "input_cache": {s: e.describe() if e is not None else None for s, e in self._cache_entries.items()}
            if self.cache else None,
        }
        if self.source == "folder":
            from .folder import read_meta

            meta = read_meta(find_task_dir(self.data_root, self.spec)) or {}
            info.update(data_root=str(self.data_root), tfds_builder=meta.get("tfds_builder"),
                        jpeg_quality=meta.get("jpeg_quality"), mock_data=meta.get("mock_data", False))
        return info

    def _warn_if_mock(self) -> None:
        from .folder import read_meta

        task_dir = find_task_dir(self.data_root, self.spec)
        meta = read_meta(task_dir) or {}
        if meta.get("mock_data"):  # one plain line (a warning would print its source line in every job)
            log.warning("%s was prepared from FAKE data (mock_examples=...): its accuracy means nothing", task_dir)

    # -- datasets --------------------------------------------------------------------------------------
    def _dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            if self.source == "embedded":
                from .embedded import digits_dataset

                self._datasets[split] = digits_dataset(split, self.image_size, self.normalization)
            else:
                tf = build_transform(self.image_size, interpolation=self.interpolation,
                                     normalization=self.normalization)
                self._datasets[split] = VTABFolderDataset(self.data_root, self.spec, split, tf, link_root=self.link_root)
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        for split in dict.fromkeys((self.train_split, self.eval_split, self.val_split)):
            self._dataset(split)

    # -- input cache and on-device normalisation -------------------------------------------------------
    def _init_cache(self, cache: bool | None, cache_dir: str | os.PathLike | None,
                    cache_max_gb: float | None) -> None:
        from .cache import DEFAULT_MAX_GB

        if cache is not None and not isinstance(cache, bool):
            raise ConfigError(f"cache must be true, false or null (default: on for folder data), got {cache!r}")
        max_gb = DEFAULT_MAX_GB if cache_max_gb is None else float(cache_max_gb)
        if not max_gb > 0:
            raise ConfigError(f"cache_max_gb must be positive, got {cache_max_gb!r} (cache=false turns the cache off)")
        self.cache = self.source == "folder" and cache is not False
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.cache_max_gb = max_gb
        self.normalizer = Uint8Normalizer.from_name(self.normalization)
        self._cache_entries: dict[str, Any] = {}
        self._served: dict[str, Dataset] = {}

    def prepare_data(self) -> None:
        """Build the input cache of the used splits (Lightning calls this once per node, before ``setup``)."""
        for split in dict.fromkeys((self.train_split, self.eval_split, self.val_split)):
            self._serve(split)

    def _serve(self, split: str) -> Dataset:
        """What the loaders read: the cached split (uint8 images) or, without a cache, the dataset itself."""
        if split not in self._served:
            ds = self._dataset(split)
            if self.cache:
                from .cache import CachedImages, ensure_cached

                entry = ensure_cached(ds, self.image_size, self.interpolation, self.cache_dir, self.cache_max_gb,
                                      workers=max(1, self.num_workers))
                if entry is not None:
                    try:
                        ds = CachedImages(entry.path, ds.targets, name=f"{self.task}/{split}")
                    except (OSError, ValueError) as e:  # e.g. evicted by another process meanwhile
                        log.warning("input cache: cannot open %s (%s); reading %s/%s from its JPEG files",
                                    entry.path, e, self.task, split)
                        entry = None
                self._cache_entries[split] = entry
            self._served[split] = ds
        return self._served[split]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input from a loader's images: uint8 (cached) -> normalised float32 on their device, as the
        PIL path computes it; float images pass through."""
        return self.normalizer(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return self.normalize(x), y

    # -- loaders ---------------------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self._serve(split)
        batch = self.batch_size if train else self.eval_batch_size
        if train and len(ds) < batch:
            raise ConfigError(f"{self.task}/{split} has {len(ds)} images, fewer than one batch of {batch} "
                             f"(drop_last=True would give no training step)")
        sampler = None
        if not train and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # Evaluate every image exactly once across ranks. Lightning's default DistributedSampler pads the
            # split with repeats to equal shards, which would bias the reported top-1.
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(ds, shuffle=False)
        return DataLoader(
            ds, batch_size=batch, shuffle=train, drop_last=train, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, sampler=sampler,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_split, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_split, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.eval_split, train=False)
