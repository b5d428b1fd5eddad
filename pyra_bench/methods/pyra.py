"""PYRA + LoRA: ToMe merging whose source tokens are modulated by PYRA (or one of the ablations)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..models.pyra import build_modulator, check_modulator_options
from . import options
from .base import METHODS, BuildContext
from .tome import ToMe


@METHODS.register("pyra")
class PYRAMethod(ToMe):
    name = "pyra"
    cost_factor = 0.77  # GPU time of a run relative to PEFT (sweep estimates without records)
    display_name = "PYRA"
    param_group = "pyra"
    bare_key_options = ("variant",)
    options = options.PYRA

    def __init__(self, schedule: Any = "high", **kwargs: Any):
        super().__init__(schedule, **kwargs)
        o = self.opts
        self.variant, self.wr_init, self.ln_eps = check_modulator_options(o.variant, o.wr_init, o.ln_eps)

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
