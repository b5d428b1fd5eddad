"""Models: backbones, LoRA, token merging, PYRA and the ViT patch that ties them together."""

from .backbones import (
    BACKBONES,
    BackboneSpec,
    CheckpointError,
    backbone_spec_from_config,
    create_backbone,
    get_backbone,
    load_checkpoint,
)
from .build import build_model
from .lora import LoRALinear, add_lora_to_qkv, merge_lora
from .macs import BudgetError, ViTGeometry
from .merging import TokenReducer, ToMeMerge, bipartite_matching, merge_wavg
from .params import ParamCount, count_parameters
from .pyra import MODULATORS, PYRA_VARIANTS, build_modulator
from .schedules import (
    PRESETS,
    ScheduleError,
    check_schedule,
    resolve_schedule,
    schedule_for_macs,
    token_counts,
)
from .vit import UnsupportedModelError, patch_vit

__all__ = [
    "BACKBONES", "BackboneSpec", "CheckpointError", "backbone_spec_from_config", "create_backbone", "get_backbone", "load_checkpoint",
    "build_model", "LoRALinear", "add_lora_to_qkv", "merge_lora", "ToMeMerge", "TokenReducer",
    "bipartite_matching", "merge_wavg", "ParamCount", "count_parameters", "MODULATORS", "PYRA_VARIANTS",
    "build_modulator", "BudgetError", "ViTGeometry", "PRESETS", "ScheduleError", "check_schedule",
    "resolve_schedule", "schedule_for_macs", "token_counts",
    "UnsupportedModelError", "patch_vit",
]
