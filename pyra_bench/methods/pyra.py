"""PYRA + LoRA: ToMe merging whose source tokens are modulated by PYRA (or one of the ablations)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..models.pyra import build_modulator, check_modulator_options
from .base import METHODS, BuildContext
from .tome import ToMe


@METHODS.register("pyra")
class PYRAMethod(ToMe):
    name = "pyra"
    cost_factor = 0.77  # GPU time of a run relative to PEFT (sweep estimates without records)
    display_name = "PYRA"
    param_group = "pyra"
    bare_key_options = ("variant",)

    def __init__(self, schedule: Any = "high", variant: str = "full", wr_init: str = "uniform",
                 ln_eps: float = 1e-5, **kwargs: Any):
        super().__init__(schedule, **kwargs)
        self.variant, self.wr_init, self.ln_eps = check_modulator_options(variant, wr_init, ln_eps)  # fail early

    def make_modulator(self, r: int, ctx: BuildContext) -> nn.Module:
        return build_modulator(self.variant, r, ctx.dim, wr_init=self.wr_init, ln_eps=self.ln_eps)

    def describe_structure(self) -> dict[str, Any]:
        return {"variant": self.variant}

    def paper_param_count(self, model: nn.Module) -> int:
        """The paper counts W_r and W_D (the generators), not the LayerNorm's affine weights."""
        return sum(blk.token_reducer.modulator.paper_param_count()
                   for blk in model.blocks if blk.token_reducer is not None)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "variant": self.variant}
