"""Evaluation-style image transforms, as the PYRA / NOAH authors use for VTAB-1k (no augmentation).

The authors' ``lib/datasets.py::build_transform`` with ``--direct_resize --no_aug``:
``Resize((224, 224), interpolation=3)`` (bicubic, no aspect preservation) -> ``ToTensor`` -> ``Normalize``
with ImageNet mean/std for every backbone (their choice; ``inception`` = 0.5/0.5 is the other common one).
The same transform is used for training and evaluation. Note the official VTAB pipeline differs (TF
bilinear resize of the TFDS tensors, inputs in [0, 1]); record which format a run used.

The transform splits in two halves with the same result: :func:`build_resize` + :func:`to_uint8_chw`
(decode-side, what the input cache stores) and :class:`Uint8Normalizer` (``uint8 -> (x/255 - mean)/std``,
run on the device), bit-identical to ``ToTensor`` + ``Normalize``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..registry import UnknownChoiceError

#: Named (mean, std) presets.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # OpenAI CLIP
}

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


def get_normalization(
    name: str | Sequence[Sequence[float]],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"imagenet"`` / ``"inception"`` / ``"clip"`` -> (mean, std); a (mean, std) pair is passed through."""
    if isinstance(name, str):
        if name not in NORMALIZATIONS:
            raise UnknownChoiceError("normalization", name, list(NORMALIZATIONS))
        return NORMALIZATIONS[name]
    mean, std = name
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def build_resize(image_size: int, interpolation: str = "bicubic"):
    """The resize half of :func:`build_transform`: direct resize of a PIL image to ``(image_size, image_size)``."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    if interpolation not in INTERPOLATIONS:
        raise UnknownChoiceError("interpolation", interpolation, list(INTERPOLATIONS))
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return T.Resize((int(image_size), int(image_size)), interpolation=InterpolationMode(interpolation))


def to_uint8_chw(img) -> np.ndarray:
    """A PIL image as the (C, H, W) uint8 array ``ToTensor`` starts from (before its ``/ 255``)."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).reshape(img.size[1], img.size[0], -1).transpose(2, 0, 1))


def build_transform(
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str = "bicubic",
    normalization: str | None = None,
):
    """Direct resize to ``(image_size, image_size)`` + ``ToTensor`` + ``Normalize`` (PIL image -> CHW float).

    Give ``mean``/``std`` explicitly or a preset ``normalization`` name (default ``"imagenet"``).
    """
    from torchvision import transforms as T

    if mean is None or std is None:
        if mean is not None or std is not None:
            raise ValueError("give both mean and std, or neither (and a normalization preset)")
        mean, std = get_normalization(normalization or "imagenet")
    elif normalization is not None:
        raise ValueError("give either mean/std or a normalization preset, not both")
    return T.Compose([
        build_resize(image_size, interpolation),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ])


class Uint8Normalizer:
    """``ToTensor`` + ``Normalize`` for batches of (B, C, H, W) uint8 images, on whatever device they are;
    bit-identical to the PIL path's tensors. Float input passes through unchanged.

    On the CPU it runs torchvision's own float32 operations (``/ 255``, ``- mean``, ``/ std``). Elsewhere a
    device may round a division differently (CUDA turns a division by a scalar into a multiplication by its
    reciprocal), so the 256 possible results per channel are computed once on the CPU with those operations
    into a (C, 256) table and a batch becomes one table look-up.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.as_tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.as_tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        v = torch.arange(256, dtype=torch.uint8).to(torch.float32).div(255)
        self.table = (v.view(1, -1, 1) - self.mean).div(self.std).flatten()  # row c * 256 + v
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_name(cls, normalization: str | Sequence[Sequence[float]]) -> Uint8Normalizer:
        return cls(*get_normalization(normalization))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            return x
        C = self.mean.shape[0]
        if x.dim() < 3 or x.shape[-3] != C:
            raise ValueError(f"expected (..., {C}, H, W) uint8 images, got shape {tuple(x.shape)}")
        if x.device.type == "cpu":
            return x.to(torch.float32).div(255).sub_(self.mean).div_(self.std)
        return self.by_table(x)

    def by_table(self, x: torch.Tensor) -> torch.Tensor:
        """The table look-up (what runs off the CPU), for uint8 (..., C, H, W) ``x`` on any device."""
        C = self.mean.shape[0]
        if x.device not in self._on:
            offsets = (torch.arange(C, dtype=torch.int32) * 256).view(C, 1, 1)
            self._on[x.device] = self.table.to(x.device), offsets.to(x.device)
        table, offsets = self._on[x.device]
        return table.index_select(0, (x.to(torch.int32) + offsets).flatten()).view(x.shape)
