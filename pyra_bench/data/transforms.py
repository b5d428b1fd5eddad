"""Evaluation-style image transforms, as the PYRA / NOAH authors use for VTAB-1k (no augmentation).

The authors' ``lib/datasets.py::build_transform`` with ``--direct_resize --no_aug``:
``Resize((224, 224), interpolation=3)`` (bicubic, no aspect preservation) -> ``ToTensor`` -> ``Normalize``
with ImageNet mean/std for every backbone (their choice; ``inception`` = 0.5/0.5 is the other common one).
The same transform is used for training and evaluation. Note the official VTAB pipeline differs (TF
bilinear resize of the TFDS tensors, inputs in [0, 1]); record which format a run used.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..registry import UnknownChoiceError

#: Named (mean, std) presets.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


def get_normalization(
    name: str | Sequence[Sequence[float]],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"imagenet"`` / ``"inception"`` -> (mean, std); a (mean, std) pair is passed through."""
    if isinstance(name, str):
        if name not in NORMALIZATIONS:
            raise UnknownChoiceError("normalization", name, list(NORMALIZATIONS))
        return NORMALIZATIONS[name]
    mean, std = name
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


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
    from torchvision.transforms import InterpolationMode

    if interpolation not in INTERPOLATIONS:
        raise UnknownChoiceError("interpolation", interpolation, list(INTERPOLATIONS))
    if mean is None or std is None:
        if mean is not None or std is not None:
            raise ValueError("give both mean and std, or neither (and a normalization preset)")
        mean, std = get_normalization(normalization or "imagenet")
    elif normalization is not None:
        raise ValueError("give either mean/std or a normalization preset, not both")
    if int(image_size) <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return T.Compose([
        T.Resize((int(image_size), int(image_size)), interpolation=InterpolationMode(interpolation)),
        T.ToTensor(),
        T.Normalize(mean=list(mean), std=list(std)),
    ])
