"""ToMe + LoRA: parameter-free token merging with the paper's schedules (the strongest baseline)."""

from __future__ import annotations

from torch import nn

from ..models.merging import ToMeMerge
from ..models.vit import set_token_reducers
from .base import METHODS, BuildContext, Method


@METHODS.register("tome")
class ToMe(Method):
    name = "tome"

    def make_modulator(self, r: int, ctx: BuildContext) -> nn.Module | None:
        return None

    def apply(self, model: nn.Module, ctx: BuildContext) -> None:
        super().apply(model, ctx)
        set_token_reducers(model, [
            ToMeMerge(r, ctx.class_token, ctx.distill_token, self.make_modulator(r, ctx)) if r > 0 else None
            for r in self.schedule
        ])
