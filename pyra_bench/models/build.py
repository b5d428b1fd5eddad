"""``build_model``: one call from a backbone name, a class count, a method and a schedule to a model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from timm.layers import PatchEmbed
from torch import nn

from ..errors import ConfigError, InputFileNotFoundError
from ..schema import Lora
from .backbones import BackboneSpec, create_backbone, get_backbone, load_checkpoint
from .lora import check_lora_options
from .macs import ViTGeometry
from .merging import SPLITS
from .peft import LoraPeft, Peft, make_peft
from .variants import check_variant
from .vit import (
    MERGE_SITES,
    UnsupportedModelError,
    has_class_token,
    num_input_tokens,
    num_protected_tokens,
    patch_vit,
)


def build_model(
    backbone: str | BackboneSpec | nn.Module = "vit_b16_in21k",
    num_classes: int = 100,
    method: str | Any = "pyra",
    schedule: Any = None,
    *,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.1,
    lora_init: str = "standard",
    peft: str | Mapping[str, Any] | Peft | None = None,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    drop_path_rate: float = 0.1,
    prop_attn: bool = True,
    merge_split: str = "alternate",
    merge_site: str = "after_attention",
    method_kwargs: dict[str, Any] | None = None,
    device: str = "cpu",
    bench_batch_size: int | None = None,
    bench_dtype: str = "float32",
) -> nn.Module:
    """Build a frozen ViT with LoRA on qkv and the chosen method applied.

    Example -- the paper's ViT-B/16, LoRA rank 8, PYRA, "high" schedule::

        model = build_model("vit_b16_in21k", num_classes=100, method="pyra", schedule="high",
                            checkpoint="weights/ViT-B_16.npz")

    From a backbone config (``conf/backbone/*.yaml``, any timm ViT)::

        spec = backbone_spec_from_config(cfg.backbone)
        model = build_model(spec, num_classes, cfg.method.name, cfg.compression,
                            prop_attn=cfg.backbone.get("prop_attn", True), ...)

    ``peft``: the PEFT choice (:mod:`pyra_bench.models.peft`): a name (``"adapter"``), a ``peft`` config
    (``{"name": "vpt", "num_tokens": 10}``) or a :class:`~pyra_bench.models.peft.Peft`; None = LoRA from the
    ``lora_*`` arguments (the default). Adapter, VPT and prefix do not fold into the inference model.
    ``merge_split`` / ``merge_site``: the labelled merge variants (``backbone.merge_split``,
    ``backbone.merge_site``; defaults: the official code's), taken by methods with ``merge_variants``.
    ``backbone`` may also be a timm ``VisionTransformer`` instance (its head is reset to ``num_classes``).
    ``method`` is a registered name (``pyra_bench.methods.METHODS``) or a ``Method`` instance; the
    method and spec objects are attached as ``model.pyra_method`` / ``model.pyra_backbone``.
    Only the PEFT modules (LoRA, ...), the head(s) and the method's own parameters require gradients. ``device``,
    ``bench_batch_size`` and ``bench_dtype``: where and how speed targets (``speedup:<x>``) are timed: the
    run's device, its throughput batch (None: 512 on CUDA, 8 on the CPU) and dtype. The model itself is
    built on the CPU (or the current default device) whatever ``device`` says.
    """
    from ..methods import Method, get_method

    if peft is None:
        # the Python API's LoRA values, checked before anything is built (a null rank: the backbone's, >= 1)
        check_lora_options(1 if lora_rank is None else lora_rank, lora_alpha, lora_dropout, lora_init)
        adapt: Peft = LoraPeft(Lora.model_construct(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                                                    init=lora_init))
    else:
        adapt = make_peft({"name": peft} if isinstance(peft, str) else peft)
    merge_split, merge_site = check_variant("merge_split", merge_split), check_variant("merge_site", merge_site)
    if isinstance(method, Method):
        m = method
    else:
        kw = dict(method_kwargs or {})
        if schedule is not None:
            kw["schedule"] = schedule
        m = get_method(method, **kw)

    if isinstance(backbone, nn.Module):
        model = backbone
        spec = BackboneSpec("custom", None, 8 if lora_rank is None else lora_rank, None)
        model.reset_classifier(num_classes)
    else:
        spec = get_backbone(backbone) if isinstance(backbone, str) else backbone
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise InputFileNotFoundError(f"checkpoint file not found: {checkpoint}")
        model = create_backbone(spec, num_classes, pretrained=pretrained, drop_path_rate=drop_path_rate)
    try:
        patch_vit(model, prop_attn=prop_attn, merge_site=merge_site)
        if not isinstance(model.patch_embed, PatchEmbed):
            raise UnsupportedModelError(f"its patch embedding is a {type(model.patch_embed).__name__} (a hybrid "
                                        "CNN stem?); only timm's PatchEmbed is supported")
    except UnsupportedModelError as e:
        arch = f" (timm {spec.timm_name})" if spec.timm_name else ""
        raise UnsupportedModelError(f"backbone {spec.name!r}{arch} is not supported: {e}") from None
    if (merge_split, merge_site) != (SPLITS[0], MERGE_SITES[0]) and not m.merge_variants:
        from ..methods import METHODS

        takers = ", ".join(n for n in METHODS.names() if getattr(METHODS.get(n), "merge_variants", False))
        raise ConfigError(f"backbone.merge_split={merge_split!r} / merge_site={merge_site!r}: method {m.name!r} "
                          f"does not merge with ToMe's bipartite matching, so only the defaults ({SPLITS[0]}, "
                          f"{MERGE_SITES[0]}) apply; methods that take them: {takers}")

    from ..methods import BuildContext

    extra = adapt.prompt_tokens  # VPT's prompts: tokens of every block, protected like the prefix tokens
    ctx = BuildContext(spec, len(model.blocks), model.embed_dim, model.blocks[0].attn.num_heads,
                       num_input_tokens(model) + extra, num_protected_tokens(model) + extra, has_class_token(model),
                       geometry=adapt.geometry(ViTGeometry.from_model(model), spec), device=str(device),
                       bench_batch_size=bench_batch_size,
                       bench_dtype=bench_dtype, model=model, merge_split=merge_split, merge_site=merge_site,
                       peft=adapt)
    # Check the schedule before any further work (it is cheap and a common mistake).
    m.resolve_schedule(ctx)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, spec.name)

    model.requires_grad_(False)
    model.pyra_backbone_params = sum(p.numel() for n, p in model.named_parameters()
                                     if not n.startswith(("head.", "head_dist.")))
    adapt.apply(model, spec)
    for head in (getattr(model, "head", None), getattr(model, "head_dist", None)):
        if isinstance(head, nn.Module):
            head.requires_grad_(True)
    m.apply(model, ctx)
    model.pyra_method = m
    model.pyra_peft = adapt
    model.pyra_backbone = spec
    model.pyra_context = ctx
    return model
