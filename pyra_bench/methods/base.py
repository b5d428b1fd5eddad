"""The method interface: everything the framework needs to know about a compression/adaptation method.

A method is one class registered in :data:`METHODS` (one file in this package) plus one config in
``conf/method/``. The framework builds the frozen backbone with LoRA, then calls :meth:`Method.apply`;
any parameter that ``apply`` creates is trainable (the backbone is frozen before), so the method owns its
parameters without bookkeeping. Training asks the method for an extra loss, its stages and its
parameter groups; measurement asks it for the inference model. No code outside a method branches on
method names.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnknownOptionError
from ..models.backbones import BackboneSpec
from ..models.lora import merge_lora
from ..models.macs import ViTGeometry
from ..models.schedules import check_schedule, resolve_schedule
from ..registry import Registry
from ..schema import Options


@dataclass(frozen=True)
class BuildContext:
    """Facts about the backbone a method is applied to."""

    backbone: BackboneSpec
    depth: int
    dim: int
    num_heads: int
    num_tokens: int  # tokens entering block 0 (patches + prefix tokens)
    #: leading tokens never merged or pruned: timm's prefix tokens (class, distillation, registers)
    num_protected: int
    #: whether token 0 is a class token (class-attention methods need one; average-pool heads have none)
    class_token: bool
    #: matmul shapes for analytic MAC counts (FLOPs targets); None when not known
    geometry: ViTGeometry | None = None
    #: where the run's model runs: speed targets (``speedup:<x>``) are timed there
    device: str = "cpu"
    #: throughput batch size and dtype of speed targets (None: measure.default_batch_size(device))
    bench_batch_size: int | None = None
    bench_dtype: str = "float32"
    #: the patched backbone before LoRA and reducers, for methods that time candidate structures
    model: nn.Module | None = field(default=None, compare=False, repr=False)
    #: ToMe's bipartite split (``backbone.merge_split``) and where a block merges (``backbone.merge_site``);
    #: only methods with ``Method.merge_variants`` accept other values than these defaults (the official code's)
    merge_split: str = "alternate"
    merge_site: str = "after_attention"
    #: the PEFT choice (:class:`pyra_bench.models.peft.Peft`; None: LoRA): methods that time candidate
    #: structures add the choices that do not fold (they stay in the inference model)
    peft: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Stage:
    """One training stage of a method.

    The trainer runs the stages in order; each is a full Lightning ``fit`` over ``epochs_fraction`` of the
    run's epoch budget (at least one epoch), with a fresh optimiser over the parameters that require
    gradients when the stage starts, and the paper's warm-up + cosine schedule. Before a stage the trainer
    calls :meth:`Method.on_stage_start`; after it, it saves ``{"model": state_dict, "method_state":
    method.state()}`` so a later run resumes after the last finished stage (:meth:`Method.restore`).
    ``evaluate``: whether test accuracy is measured during this stage (only the last stage is reported).
    ``task``: train this stage on another task's train split (e.g. a search on other data); None = the run's.
    """

    name: str
    epochs_fraction: float = 1.0
    evaluate: bool = True
    task: str | None = None


class Method:
    name: str = "base"
    #: how tables, figures and logs name the method (default: the registered name)
    display_name: str | None = None
    #: parameter-group name for the method's own parameters (the separate lr/wd of the trainer config)
    param_group: str = "method"
    #: GPU time of a run relative to PEFT's, for sweep estimates when no records exist
    cost_factor: float = 1.0
    #: constructor options that do NOT change results (e.g. a worker count); every other option does, so
    #: it is part of the run id (when it differs from its default) and of the record check
    execution_options: frozenset[str] = frozenset()
    #: options whose value alone names them in the run id (PYRA's ``variant``: ``pyra-wd_sigmoid``);
    #: other non-default options appear as ``<option>=<value>``
    bare_key_options: tuple[str, ...] = ()
    #: True when applying the method times real models (a ``speedup:<x>`` target): input checks then build
    #: the model for real instead of on the meta device (shapes only)
    measures_at_build: bool = False
    #: True when the method merges with ToMe's bipartite matching, so it takes the labelled merge variants
    #: ``backbone.merge_split`` / ``backbone.merge_site``; other methods refuse non-default values
    merge_variants: bool = False

    #: the declared options (:mod:`pyra_bench.methods.options`): the constructor takes and validates them
    #: (as ``self.opts``); None (a plug-in's own constructor): the constructor's keyword arguments are its options
    options: type[Options] | None = None

    def __init__(self, schedule: Any = "none", **kwargs: Any):
        unknown = sorted(set(kwargs) - set(self.options.model_fields if self.options else ()))
        if unknown:
            raise UnknownOptionError(f"method {self.name!r} got unknown options: {', '.join(unknown)}")
        self.opts = self.options.check(kwargs) if self.options else None
        self.schedule_spec = schedule
        self.schedule: list[int] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A class with declared options: ``inspect.signature`` shows them as its constructor's."""
        super().__init_subclass__(**kwargs)
        P = inspect.Parameter  # noqa: N806
        if "options" in vars(cls):
            first = inspect.signature(cls.__init__).parameters.get("schedule", P("schedule", P.POSITIONAL_OR_KEYWORD))
            cls.__signature__ = inspect.Signature([first] + [
                P(n, P.KEYWORD_ONLY, default=f.default, annotation=f.annotation)
                for n, f in cls.options.model_fields.items()])
        elif "__init__" in vars(cls):  # its own constructor: inspect reads it
            cls.__signature__ = None

    # -- identity -----------------------------------------------------------------------------------
    @classmethod
    def label(cls) -> str:
        return cls.display_name or cls.name

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """The options with their defaults: the declared ones and the constructors' keyword arguments (all
        classes in the MRO; ``schedule`` excluded)."""
        out = {n: f.default for n, f in cls.options.model_fields.items()} if cls.options else {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.name not in ("self", "schedule") and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                    out[p.name] = None if p.default is inspect.Parameter.empty else p.default
        return out

    @classmethod
    def result_options(cls, options: Mapping[str, Any] | None) -> dict[str, Any]:
        """The result-changing options among ``options`` (a method config's ``kwargs``) that differ from
        the constructor's defaults, sorted by name: what the run id and the record name besides the method."""
        defaults = cls.option_defaults()
        return {k: v for k, v in sorted(dict(options or {}).items())
                if k not in cls.execution_options and (k not in defaults or defaults[k] != v)}

    @classmethod
    def run_key(cls, options: Mapping[str, Any] | None) -> str:
        """The method's part of a run id: its name plus its non-default result-changing options."""
        parts = [cls.name]
        for k, v in cls.result_options(options).items():
            v = "-".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)
            parts.append(v if k in cls.bare_key_options else f"{k}={v}")
        return "-".join(p.replace("/", "_").replace(" ", "") for p in parts)

    # -- building -----------------------------------------------------------------------------------
    def resolve_schedule(self, ctx: BuildContext) -> list[int]:
        r = resolve_schedule(self.schedule_spec, ctx.depth, ctx.backbone.schedule_family)
        check_schedule(r, ctx.num_tokens, ctx.num_protected)
        return r

    def apply(self, model: nn.Module, ctx: BuildContext) -> None:
        """Modify the (patched, frozen, LoRA-equipped) model in place."""
        self.schedule = self.resolve_schedule(ctx)

    # -- training -----------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage("train")]

    def on_stage_start(self, stage: Stage, model: nn.Module, data: Any = None) -> None:
        """Called before each stage (e.g. prune after a LoRA warm-up stage)."""

    def training_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """The training objective of one batch: ``(loss, logits)``; logits may be None when the stage's
        objective has none (e.g. label-free distillation). Default: cross-entropy on the task labels."""
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """An additional training loss (e.g. a FLOPs-budget penalty), read after each training forward."""
        return None

    def state(self) -> dict[str, Any]:
        """JSON-able structural state (searched schedule, kept channels, ...) saved with stage checkpoints."""
        return {"schedule": list(self.schedule)}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        """Re-apply structural changes recorded by :meth:`state` to a freshly built model, before its
        weights are loaded from a stage checkpoint."""

    # -- accounting and inference --------------------------------------------------------------------
    def method_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The method's own trainable parameters (neither PEFT -- LoRA, adapters, prompts, prefix -- nor the
        classifier head)."""
        from ..models.peft import peft_parameter_names

        peft = peft_parameter_names(model)
        return {n: p for n, p in model.named_parameters()
                if p.requires_grad and n not in peft and not n.startswith(("head.", "head_dist."))}

    def paper_param_count(self, model: nn.Module) -> int:
        """The method's parameters as the paper's "# params" column counts them (default: all)."""
        return sum(p.numel() for p in self.method_parameters(model).values())

    def inference_model(self, model: nn.Module) -> nn.Module:
        """The model as deployed: a copy with LoRA folded into the weights (no extra FLOPs). The other PEFT
        choices do not fold: adapters, VPT's prompts and prefix keys/values stay in the inference model
        (their cost is in its MACs and measured speed, :mod:`pyra_bench.models.peft`)."""
        return merge_lora(model, inplace=False).eval()

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "schedule": self.schedule}


METHODS: Registry[type[Method]] = Registry("method", entry_points="pyra_bench.methods")
