"""``build_model``: one call from a backbone name, a class count, a method and a schedule to a model."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from ..errors import ConfigError, InputFileNotFoundError
from .backbones import BackboneSpec, create_backbone, get_backbone, load_checkpoint
from .lora import LORA_INITS, add_lora_to_qkv
from .vit import num_input_tokens, num_protected_tokens, patch_vit


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
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    drop_path_rate: float = 0.1,
    prop_attn: bool = True,
    method_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a frozen ViT with LoRA on qkv and the chosen method applied.

    Example -- the paper's ViT-B/16, LoRA rank 8, PYRA, "high" schedule::

        model = build_model("vit_b16_in21k", num_classes=100, method="pyra", schedule="high",
                            checkpoint="weights/ViT-B_16.npz")

    ``backbone`` may also be a timm ``VisionTransformer`` instance (its head is reset to ``num_classes``).
    ``method`` is a registered name (``pyra_bench.methods.METHODS``) or a ``Method`` instance; the
    method and spec objects are attached as ``model.pyra_method`` / ``model.pyra_backbone``.
    Only LoRA, the head(s) and the method's own parameters require gradients.
    """
    from ..methods import Method, get_method

    if lora_init not in LORA_INITS:
        raise ConfigError(f"unknown lora_init {lora_init!r}; valid choices: {', '.join(LORA_INITS)}")
    if isinstance(method, Method):
        m = method
    else:
        kw = dict(method_kwargs or {})
        if schedule is not None:
            kw["schedule"] = schedule
        m = get_method(method, **kw)

    if isinstance(backbone, nn.Module):
        model = backbone
        spec = BackboneSpec("custom", None, lora_rank or 8, None)
        model.reset_classifier(num_classes)
    else:
        spec = get_backbone(backbone) if isinstance(backbone, str) else backbone
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise InputFileNotFoundError(f"checkpoint file not found: {checkpoint}")
        model = create_backbone(spec, num_classes, pretrained=pretrained, drop_path_rate=drop_path_rate)
    patch_vit(model, prop_attn=prop_attn)
    has_cls, has_dist = num_protected_tokens(model)

    from ..methods import BuildContext

    ctx = BuildContext(spec, len(model.blocks), model.embed_dim, model.blocks[0].attn.num_heads,
                       num_input_tokens(model), has_cls, has_dist)
    # Check the schedule before any further work (it is cheap and a common mistake).
    m.resolve_schedule(ctx)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, spec.name)

    model.requires_grad_(False)
    model.pyra_backbone_params = sum(p.numel() for n, p in model.named_parameters()
                                     if not n.startswith(("head.", "head_dist.")))
    add_lora_to_qkv(model, lora_rank or spec.lora_rank, alpha=lora_alpha, dropout=lora_dropout, init=lora_init)
    for head in (getattr(model, "head", None), getattr(model, "head_dist", None)):
        if isinstance(head, nn.Module):
            head.requires_grad_(True)
    m.apply(model, ctx)
    model.pyra_method = m
    model.pyra_backbone = spec
    model.pyra_context = ctx
    return model
