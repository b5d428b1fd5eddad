"""Plain PEFT: LoRA on the uncompressed backbone (the paper's "PEFT" rows; "PEFT*" on a smaller backbone)."""

from __future__ import annotations

from .base import METHODS, BuildContext, Method


@METHODS.register("peft")
class PEFT(Method):
    name = "peft"

    def resolve_schedule(self, ctx: BuildContext) -> list[int]:
        if self.schedule_spec not in (None, "none", 0, "0"):
            raise ValueError(f"method 'peft' does not compress; got schedule={self.schedule_spec!r} (use 'none')")
        return [0] * ctx.depth
