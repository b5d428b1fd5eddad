"""Data: the VTAB-1k task table, the folder dataset, TFDS preparation, transforms, embedded offline data.

The names below are imported on first use (:mod:`pyra_bench.lazy`): the task table (:mod:`.tasks`) and
the preparation (:mod:`.prepare`) are read without torch, and Lightning (:class:`VTABDataModule`), TFDS
and mlxtend/scikit-learn (:mod:`.embedded`) load only where they are used.
"""

from ..lazy import lazy_exports

#: public name -> the sub-module that defines it
_EXPORTS = {
    "VTABDataModule": "datamodule",
    **dict.fromkeys(["EmbeddedImageDataset", "digits_arrays", "digits_dataset", "digits_split_indices", "mnist_arrays",
                     "mnist_source", "write_digits_folder"], "embedded"),
    **dict.fromkeys(["CorruptImageError", "DataNotFoundError", "LabelOutOfRangeError", "SplitFormatError",
                     "VTABFolderDataset", "prepare_command", "verify_images", "verify_once"], "folder"),
    **dict.fromkeys(["GROUPS", "SPLITS", "TASKS", "VTAB_TASKS", "TaskSpec", "derive_label", "get_task",
                     "resolve_split", "resolve_tasks", "task_names"], "tasks"),
    **dict.fromkeys(["NORMALIZATIONS", "build_transform", "get_normalization"], "transforms"),
}
__all__ = sorted([*_EXPORTS, "NORMALIZATION"])
_getattr, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str):
    return _getattr("NORMALIZATIONS" if name == "NORMALIZATION" else name)  # NORMALIZATION: an alias
