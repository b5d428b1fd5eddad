"""The deployable model of a run: saved next to its checkpoints, and loaded back without the run.

``<run_dir>/inference_model.pt`` holds the inference model's state dict (LoRA folded into qkv, pruned or
merged structure as trained), the method's structural state (schedule, kept heads/channels, ...) and the
run's resolved config. :func:`load_inference_model` rebuilds the architecture from the config (no
pre-trained weights are read: every tensor comes from the file), re-applies the method's structure, merges
LoRA and loads the state dict strictly, so a file that does not fit is refused clearly::

    from pyra_bench.export import load_inference_model
    model = load_inference_model("outputs/runs/<run_id>/inference_model.pt")   # eval mode, on CPU
    logits = model(images)                                                     # (B, num_classes)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .errors import InputFileNotFoundError
from .models.backbones import CheckpointError

FILE_NAME = "inference_model.pt"


def save_inference_model(path: str | os.PathLike, infer: nn.Module, method: Any, cfg: DictConfig | dict) -> Path:
    """Write ``infer`` (the merged inference model), ``method.state()`` and ``cfg`` atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    config = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    torch.save({"state_dict": infer.state_dict(), "method_state": method.state(), "config": config}, tmp)
    os.replace(tmp, path)
    return path


def load_inference_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild and load a run's exported inference model (eval mode). See the module docstring."""
    from .data import get_task
    from .train import make_model

    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise InputFileNotFoundError(f"no exported inference model at {path} (a run writes <run_dir>/{FILE_NAME} "
                                     f"unless export_inference_model=false)")
    blob = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(blob, dict) or not {"state_dict", "method_state", "config"} <= set(blob):
        raise CheckpointError(f"{path} is not a pyra_bench inference model (expected state_dict, method_state, "
                              f"config)")
    cfg = OmegaConf.create(blob["config"])
    num_classes = int(cfg.task.get("num_classes") or get_task(cfg.task.name).num_classes)
    model = make_model(cfg, num_classes, pretrained=False, checkpoint=None)
    method = model.pyra_method
    method.restore(model, blob["method_state"])
    infer = method.inference_model(model)
    try:
        infer.load_state_dict(blob["state_dict"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the model its config describes: {e}") from e
    infer.pyra_config = blob["config"]  # the run's resolved config (plain dict), for measuring / reporting
    return infer.to(map_location).eval()
