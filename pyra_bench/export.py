"""The deployable model of a run: saved next to its checkpoints, and loaded back without the run.

``<run_dir>/inference_model.safetensors`` holds the inference model's tensors (LoRA folded into qkv, pruned
or merged structure as trained); ``<run_dir>/inference_model.json`` the method's structural state
(schedule, kept heads/channels, ...) and the run's resolved config. :func:`load_inference_model` rebuilds
the architecture from the config (no pre-trained weights are read: every tensor comes from the file),
re-applies the method's structure, merges LoRA and loads the tensors strictly, so a file that does not fit
is refused clearly. Nothing in these files can run code (safetensors + JSON), and the JSON's method config is
data: a ``_target_`` in it must name the class already registered under its name, else the file is refused
before anything is imported (:func:`pyra_bench.methods.loaded_method_config`)::

    from pyra_bench.export import load_inference_model
    model = load_inference_model("outputs/runs/<run_id>")      # eval mode, on CPU
    logits = model(images)                                     # (B, num_classes)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .errors import CheckpointFormatError, InputFileNotFoundError
from .methods import loaded_method_config
from .models.backbones import CheckpointError
from .records import atomic_write_json

FILE_NAME = "inference_model.safetensors"
META_NAME = "inference_model.json"
FORMAT = 2


def save_inference_model(run_dir: str | os.PathLike, infer: nn.Module, method: Any, cfg: DictConfig | dict) -> Path:
    """Write ``infer`` (the merged inference model), ``method.state()`` and ``cfg`` to ``run_dir``."""
    from .fileio import atomic_save_tensors

    folder = Path(run_dir)
    path = folder / FILE_NAME
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    atomic_save_tensors(path, {k: v.detach().cpu().contiguous().clone() for k, v in infer.state_dict().items()},
                        metadata={"format": str(FORMAT)})
    atomic_write_json(folder / META_NAME, {"format": FORMAT, "tensors": FILE_NAME, "tensors_bytes": path.stat().st_size,
                                           "method_state": method.state(), "config": config})
    return path


def _locate(path: Path) -> tuple[Path, Path]:
    if path.is_dir():
        return path / META_NAME, path / FILE_NAME
    if path.suffix == ".safetensors":
        return path.with_name(META_NAME), path
    if path.suffix == ".json":
        return path, path.with_name(FILE_NAME)
    if path.suffix == ".pt":
        raise CheckpointFormatError(f"{path} is an inference model of an older pyra_bench (a torch pickle); it is "
                                    f"not loaded, since unpickling can run code. Re-export it by re-running the run "
                                    f"(force=true) or loading the run's stage files.")
    return path.with_name(META_NAME), path.with_name(FILE_NAME)


def load_inference_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and load a run's exported inference model (eval mode). See the module docstring."""
    from safetensors.torch import load_file

    from .data import get_task
    from .factory import make_model

    meta_path, tensors_path = _locate(Path(path))
    if not meta_path.is_file() or not tensors_path.is_file():
        raise InputFileNotFoundError(f"no exported inference model at {path} (a run writes <run_dir>/{FILE_NAME} "
                                     f"and {META_NAME} unless export_inference_model=false)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(f"{meta_path} is not readable JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not {"method_state", "config"} <= set(meta):
        raise CheckpointError(f"{meta_path} is not a pyra_bench inference model (format {FORMAT}: method_state, "
                              f"config)")
    if not isinstance(meta["config"], dict) or not isinstance(meta["config"].get("method"), dict):
        raise CheckpointError(f"{meta_path} is not a pyra_bench inference model (its config has no method)")
    meta["config"]["method"] = loaded_method_config(meta["config"]["method"], meta_path)  # before any import
    try:
        state = load_file(str(tensors_path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointFormatError(f"{tensors_path} is not a readable safetensors file ({e})") from e
    cfg = OmegaConf.create(meta["config"])
    if isinstance(cfg.get("compression"), str) and str(cfg.compression).startswith("speedup:") \
            and meta["method_state"].get("schedule") is not None:  # the schedule chosen then, not a new search
        cfg.compression = list(meta["method_state"]["schedule"])
    num_classes = int(cfg.task.get("num_classes") or get_task(cfg.task.name).num_classes)
    model = make_model(cfg, num_classes, pretrained=False, checkpoint=None)
    method = model.pyra_method
    method.restore(model, meta["method_state"])
    infer = method.inference_model(model)
    try:
        infer.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{tensors_path} does not fit the model its config describes: {e}") from e
    infer.pyra_config = meta["config"]  # the run's resolved config (plain dict), for measuring / reporting
    return infer.to(map_location).eval()
