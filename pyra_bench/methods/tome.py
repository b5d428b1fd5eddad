"""ToMe + LoRA: parameter-free token merging with the paper's schedules (the strongest baseline).

Besides the schedule forms of :mod:`pyra_bench.models.schedules`, ToMe (and PYRA, its subclass) take two
*targets*, resolved against the backbone when the model is built and recorded in :meth:`ToMe.state`:

* ``flops:<f>``: the ToMe-form schedule whose analytic MACs are closest to ``f`` of the unmerged model's
  (:func:`~pyra_bench.models.schedules.schedule_for_macs`), within ``flops_tolerance``;
* ``speedup:<x>``: the least merging whose measured throughput on the run's device is ``x`` times the
  unmerged model's (:func:`~pyra_bench.models.speedup.find_speedup_schedule`; cached per device).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError
from ..models.macs import operating_point
from ..models.merging import ToMeMerge
from ..models.schedules import check_schedule, schedule_for_macs
from ..models.vit import set_token_reducers
from . import options
from .base import METHODS, BuildContext, Method


@METHODS.register("tome")
class ToMe(Method):
    name = "tome"
    display_name = "ToMe"
    execution_options = frozenset({"speedup_warmup_s", "speedup_duration_s", "speedup_cache"})
    cost_factor = 0.75  # GPU time of a run relative to PEFT (sweep estimates without records)
    merge_variants = True
    options = options.ToMe

    def __init__(self, schedule: Any = "none", **kwargs: Any):
        super().__init__(schedule, **kwargs)
        o = self.opts
        self.flops_tolerance, self.speedup_cache = o.flops_tolerance, o.speedup_cache
        self.speedup_warmup_s, self.speedup_duration_s = o.speedup_warmup_s, o.speedup_duration_s
        self.target = operating_point(schedule)  # validates flops:/speedup: forms early
        self.target_info: dict[str, Any] | None = None
        self.macs_fraction: float | None = None
        self._resolved: tuple[Any, list[int], dict[str, Any] | None] | None = None

    def make_modulator(self, r: int, ctx: BuildContext) -> nn.Module | None:
        return None

    @property
    def measures_at_build(self) -> bool:  # type: ignore[override]
        return self.target is not None and self.target[0] == "speedup"

    # -- building -----------------------------------------------------------------------------------
    def resolve_schedule(self, ctx: BuildContext) -> list[int]:
        if self.target is None:
            return super().resolve_schedule(ctx)
        memo = (self.schedule_spec, ctx.geometry, ctx.num_protected, ctx.device, ctx.bench_batch_size,
                ctx.bench_dtype)
        if self._resolved is not None and self._resolved[0] == memo:
            return list(self._resolved[1])
        if ctx.geometry is None:
            raise ConfigError(f"{self.schedule_spec!r} needs the backbone's geometry (build the model with "
                              "pyra_bench.models.build_model)")
        kind, value = self.target
        if kind == "flops":
            sched, info = schedule_for_macs(value, ctx.geometry, ctx.num_protected, self.flops_tolerance,
                                            backbone=ctx.backbone.name)
        else:
            sched, info = self._speedup_schedule(value, ctx)
        check_schedule(sched, ctx.num_tokens, ctx.num_protected)
        self._resolved = (memo, sched, {"kind": kind, **info})
        return list(sched)

    def _speedup_schedule(self, x: float, ctx: BuildContext) -> tuple[list[int], dict[str, Any]]:
        from ..models.lora import merge_lora
        from ..models.speedup import find_speedup_schedule

        if ctx.model is None:
            raise ConfigError(f"{self.schedule_spec!r} times candidate models: it needs the backbone (build the "
                              "model with pyra_bench.models.build_model)")
        key = {"backbone": ctx.backbone.name, "timm_name": ctx.backbone.timm_name, "method": self.name,
               "structure": self.describe_structure(), "geometry": repr(ctx.geometry)}
        if ctx.merge_site != "after_attention":  # (the default keeps older cache entries valid)
            key["merge_site"] = ctx.merge_site
        peft = ctx.peft if ctx.peft is not None and not ctx.peft.folds else None
        if peft is not None:  # adapters, prompts, prefix stay in the inference model: timed with it
            key["peft"] = {"name": peft.name, **peft.options()}

        def deployed() -> nn.Module:
            m = merge_lora(ctx.model, inplace=False)
            if peft is not None:
                peft.apply(m, ctx.backbone)
            return m

        return find_speedup_schedule(
            x, deployed, lambda m, s: self._install(m, s, ctx), ctx.geometry,
            ctx.num_protected, key=key, device=ctx.device, batch_size=ctx.bench_batch_size, dtype=ctx.bench_dtype,
            warmup_s=self.speedup_warmup_s, duration_s=self.speedup_duration_s, use_cache=self.speedup_cache,
            backbone=ctx.backbone.name)

    def describe_structure(self) -> dict[str, Any]:
        """What, besides the schedule, changes the inference model's speed (PYRA: its variant)."""
        return {}

    def _install(self, model: nn.Module, schedule: list[int], ctx: BuildContext) -> None:
        ref = next(model.parameters())
        set_token_reducers(model, [
            ToMeMerge(r, ctx.num_protected, self.make_modulator(r, ctx), split=ctx.merge_split).to(ref.device)
            if r > 0 else None for r in schedule
        ])

    def apply(self, model: nn.Module, ctx: BuildContext) -> None:
        super().apply(model, ctx)
        self.ctx = ctx
        self.target_info = self._resolved[2] if self.target is not None and self._resolved else None
        self.macs_fraction = ctx.geometry.fraction(self.schedule) if ctx.geometry is not None else None
        self._install(model, self.schedule, ctx)

    # -- checkpoints --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        s = super().state()
        s["macs_fraction"] = self.macs_fraction
        if self.target_info is not None:
            s["target"] = self.target_info
        return s

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        """A recorded schedule wins over the one resolved now (a speed target timed elsewhere may differ)."""
        recorded = state.get("schedule")
        if recorded is not None and list(recorded) != list(self.schedule):
            check_schedule(recorded, self.ctx.num_tokens, self.ctx.num_protected)
            self.schedule = [int(r) for r in recorded]
            g = self.ctx.geometry
            self.macs_fraction = g.fraction(self.schedule) if g is not None else None
            self._install(model, self.schedule, self.ctx)
        if state.get("target") is not None:
            self.target_info = state["target"]
