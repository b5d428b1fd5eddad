"""Models: backbones, LoRA, token merging, PYRA and the ViT patch that ties them together.

The names below are imported on first use (:mod:`pyra_bench.lazy`): importing the package, or its light
registry of backbones (:mod:`.backbones`), does not import torch or timm."""

from ..lazy import lazy_exports

#: public name -> the sub-module that defines it
_EXPORTS = {
    **dict.fromkeys(["BACKBONES", "BackboneSpec", "CheckpointError", "backbone_spec_from_config", "create_backbone",
                     "get_backbone", "load_checkpoint"], "backbones"),
    "build_model": "build",
    **dict.fromkeys(["LoRALinear", "add_lora_to_qkv", "merge_lora"], "lora"),
    **dict.fromkeys(["BudgetError", "ViTGeometry"], "macs"),
    **dict.fromkeys(["TokenReducer", "ToMeMerge", "bipartite_matching", "merge_wavg"], "merging"),
    **dict.fromkeys(["ParamCount", "count_parameters"], "params"),
    **dict.fromkeys(["MODULATORS", "PYRA_VARIANTS", "build_modulator"], "pyra"),
    **dict.fromkeys(["PRESETS", "ScheduleError", "check_schedule", "resolve_schedule", "schedule_for_macs",
                     "token_counts"], "schedules"),
    **dict.fromkeys(["UnsupportedModelError", "patch_vit"], "vit"),
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
