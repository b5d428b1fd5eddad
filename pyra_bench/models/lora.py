"""LoRA on the fused qkv projection of a timm ViT block (spec section 4).

One pair per block: ``A: D -> rank`` (no bias), ``B: rank -> 3D`` (no bias), added to the output of the
frozen qkv ``nn.Linear``; dropout on the LoRA branch's input during training. The module *is* an
``nn.Linear`` (it keeps ``weight``/``bias`` under their timm names, so a timm checkpoint loads into it
unchanged) with two extra children ``lora_a``/``lora_b``.

``merge()`` folds ``scale * B @ A`` into ``weight`` (computed in float32); ``merge_lora(model)`` returns a
model whose qkv layers are plain ``nn.Linear`` again, i.e. exactly timm's parameter set.
"""

from __future__ import annotations

import copy
import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from ..schema import Int, Lora, Options, bounds_of, opt
from .vit import UnsupportedModelError

#: LoRA's initialisations (the config's ``peft.init`` choices, declared in :class:`pyra_bench.schema.Lora`).
LORA_INITS = get_args(Lora.model_fields["init"].annotation)
_BOUNDS = {name: bounds_of(Lora, name) for name in ("rank", "alpha", "dropout")}


class LoRAOptions(Options):
    """LoRA's options, as :func:`check_lora_options` takes them: the bounds and choices of the config's
    :class:`~pyra_bench.schema.Lora`, with the Python API's defaults (no dropout) and keys."""

    owner, prefix = "LoRA", None
    rank: Int = opt(..., "LoRA rank", key="backbone.lora_rank (or lora_rank= of build_model)", **_BOUNDS["rank"])
    alpha: float | None = opt(None, "LoRA alpha; null = rank", key="lora_alpha= of build_model", **_BOUNDS["alpha"])
    dropout: float = opt(0.0, "dropout on the LoRA branch's input", key="peft.dropout", **_BOUNDS["dropout"])
    init: Literal[LORA_INITS] = opt("standard", "the initialisation", key="peft.init")


def check_lora_options(rank: object, alpha: object = None, dropout: object = 0.0,
                       init: object = "standard") -> tuple[int, float | None, float, str]:
    """Validate LoRA's options (cheap; call before building anything); returns them converted (raises
    :class:`~pyra_bench.errors.OptionTypeError` / :class:`~pyra_bench.errors.ConfigError`)."""
    o = LoRAOptions.check({"rank": rank, "alpha": alpha, "dropout": dropout, "init": init})
    return o.rank, o.alpha, o.dropout, o.init


class LoRALinear(nn.Linear):
    """``y = x W^T + b + scale * B(A(dropout(x)))``; ``W``, ``b`` frozen, ``A``, ``B`` trainable."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        init: str = "standard",
        device=None,
        dtype=None,
    ):
        rank, alpha, dropout, init = check_lora_options(rank, alpha, dropout, init)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.reset_lora(init)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, **kwargs) -> LoRALinear:
        """Wrap an existing ``nn.Linear``: its weight and bias tensors are shared, not copied."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None,
                  device=w.device, dtype=w.dtype, **kwargs)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def reset_lora(self, init: str = "standard") -> None:
        """``standard``: A kaiming-uniform(a=sqrt(5)), B = 0 (the LoRA paper: the adapted model starts equal
        to the pre-trained one). ``authors``: both trunc_normal(std=0.02), as the PYRA code ends up doing
        after its global weight-init pass (so B != 0 at the start)."""
        if init == "standard":
            nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_b.weight)
        elif init == "authors":
            nn.init.trunc_normal_(self.lora_a.weight, std=0.02)
            nn.init.trunc_normal_(self.lora_b.weight, std=0.02)
        else:
            LoRAOptions.check({"rank": self.rank, "init": init})

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` in float32, shape (out, in)."""
        return self.lora_b.weight.float() @ self.lora_a.weight.float() * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + self.lora_b(self.lora_a(self.lora_dropout(x))) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


def add_lora_to_qkv(model: nn.Module, rank: int, **kwargs) -> list[str]:
    """Replace every ``attn.qkv`` ``nn.Linear`` of ``model.blocks`` with a :class:`LoRALinear`."""
    names = []
    for i, blk in enumerate(model.blocks):
        qkv = blk.attn.qkv
        if isinstance(qkv, LoRALinear):
            raise ValueError(f"block {i} already has LoRA on qkv")
        if type(qkv) is not nn.Linear:
            raise UnsupportedModelError(f"block {i}: LoRA needs attn.qkv to be a plain nn.Linear, found "
                                        f"{type(qkv).__name__}; use a timm ViT with a fused qkv Linear")
        blk.attn.qkv = LoRALinear.from_linear(qkv, rank, **kwargs)
        names.append(f"blocks.{i}.attn.qkv")
    return names


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every LoRA branch into its base weight and turn the layer back into a plain ``nn.Linear``.

    With ``inplace=False`` (default) the input model is left untouched (and trainable); a merged copy is
    returned, whose state dict has exactly the keys of the un-adapted timm model plus the method's own.
    """
    if not inplace:
        model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                w = child.weight.detach().float()
                if not child.merged:
                    w = w + child.delta_weight().detach()
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=w.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    plain.weight.copy_(w.to(child.weight.dtype))
                    if child.bias is not None:
                        plain.bias.copy_(child.bias)
                plain.weight.requires_grad_(False)
                if plain.bias is not None:
                    plain.bias.requires_grad_(False)
                setattr(parent, name, plain)
    return model
