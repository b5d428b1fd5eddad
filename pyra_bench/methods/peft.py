"""Plain PEFT: LoRA on the uncompressed backbone (the paper's "PEFT" rows; "PEFT*" on a smaller backbone)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from . import options
from .base import METHODS, BuildContext, Method


@METHODS.register("peft")
class PEFT(Method):
    name = "peft"
    display_name = "PEFT"
    cost_factor = 1.0  # GPU time of a run relative to PEFT (sweep estimates without records)
    options = options.PEFT

    def __init__(self, schedule: Any = "none", **kwargs: Any):
        super().__init__(schedule, **kwargs)
        self._check_compression()

    def _check_compression(self) -> None:
        spec = self.schedule_spec
        none = spec is None or (isinstance(spec, str) and spec.strip().lower() in ("none", "", "0")) or (
            not isinstance(spec, bool) and isinstance(spec, int) and spec == 0)
        if not none:
            others = ", ".join(n for n in METHODS.names() if n != self.name)
            raise ConfigError(f"method 'peft' does not compress, so compression={spec!r} is not allowed: it must be "
                              f"none (fix: set compression=none, or choose a compressing method: {others})")

    def resolve_schedule(self, ctx: BuildContext) -> list[int]:
        self._check_compression()
        return [0] * ctx.depth
