"""A small patch that turns a timm ``VisionTransformer`` into one whose blocks can reduce tokens.

In ToMe's style the host model stays a timm model: its modules and weights are untouched, only the
classes of the attention, the blocks and the model are swapped for subclasses whose ``forward`` threads
token *sizes* through the blocks:

* :class:`ReducingAttention`: timm's attention on ``torch.nn.functional.scaled_dot_product_attention``,
  with proportional attention entering as an additive ``log(size)`` bias on the keys; it also returns
  ``q`` and ``k`` (references, nothing extra is computed) for the block's token reducer.
* :class:`ReducingBlock`: ``x = x + attn(norm1(x)); x, size = token_reducer(x, size, q, k);
  x = x + mlp(norm2(x))`` -- merging happens between attention and MLP (spec section 2).
* the model's ``forward_features`` loops over the blocks carrying ``size``.

With no reducer in any block the patched model computes exactly timm's function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from ..errors import InputError
from .merging import TokenReducer


class UnsupportedModelError(InputError, TypeError):
    """A backbone the token-reducing patch (or a method) cannot handle; the message says what it needs."""


_PLAIN_VIT = ("use a plain timm VisionTransformer with a class token and a class-token head (e.g. the "
              "registered backbones: pyra_bench.models.BACKBONES)")


class ReducingAttention(Attention):
    prop_attn: bool = True

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None):  # type: ignore[override]
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None
        if size is not None and self.prop_attn:
            bias = size.log().to(q.dtype).view(B, 1, 1, N)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        out = self.norm(out.transpose(1, 2).reshape(B, N, -1))
        return self.proj_drop(self.proj(out)), q, k


class ReducingBlock(Block):
    token_reducer: TokenReducer | None

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None):  # type: ignore[override]
        x_attn, q, k = self.attn(self.norm1(x), size)
        x = x + self.drop_path1(self.ls1(x_attn))
        if self.token_reducer is not None:
            x, size = self.token_reducer(x, size, q, k)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size


class ReducingViTMixin:
    """Mixed in front of the host model's class (VisionTransformer or a subclass such as DeiT-distilled)."""

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("token-reducing ViTs do not take attention masks")
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        size = None
        for blk in self.blocks:
            x, size = blk(x, size)
        return self.norm(x)

    def token_reducers(self) -> list[TokenReducer | None]:
        return [blk.token_reducer for blk in self.blocks]


_CLASS_CACHE: dict[type, type] = {}


def _reducing_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"Reducing{cls.__name__}", (ReducingViTMixin, cls), {})
    return _CLASS_CACHE[cls]


def num_protected_tokens(model: VisionTransformer) -> tuple[bool, bool]:
    """(has class token, has distillation token)."""
    has_cls = getattr(model, "cls_token", None) is not None
    has_dist = getattr(model, "dist_token", None) is not None
    return has_cls, has_dist


def patch_vit(model: VisionTransformer, prop_attn: bool = True) -> VisionTransformer:
    """Patch ``model`` in place (idempotent). Refuses, by name, what the merge cannot handle."""
    if isinstance(model, ReducingViTMixin):
        return model
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f"expected a timm VisionTransformer, got {type(model).__name__}; {_PLAIN_VIT}")
    has_cls, has_dist = num_protected_tokens(model)
    if not has_cls:
        raise UnsupportedModelError(
            "models without a class token (class_token=False) are not supported: token merging protects the "
            f"class token and the head reads it; {_PLAIN_VIT}")
    if getattr(model, "reg_token", None) is not None or getattr(model, "num_reg_tokens", 0):
        raise UnsupportedModelError(
            f"ViTs with register tokens (reg_tokens={getattr(model, 'num_reg_tokens', '?')}) are not supported: "
            f"merging would mix them into the image tokens; {_PLAIN_VIT}")
    if model.global_pool != "token" or getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            f"global_pool={model.global_pool!r} is not supported: merged tokens would be pooled unweighted; "
            "create the model with global_pool='token' (class-token head), as the PYRA code does")
    if model.num_prefix_tokens != int(has_cls) + int(has_dist):
        raise UnsupportedModelError(
            f"unexpected number of prefix tokens ({model.num_prefix_tokens}; expected class "
            f"{int(has_cls)} + distillation {int(has_dist)}); {_PLAIN_VIT}")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block:
            raise UnsupportedModelError(
                f"block {i} is a {type(blk).__name__}; only timm's plain Block is supported; {_PLAIN_VIT}")
        if type(blk.attn) is not Attention or getattr(blk.attn, "gate", None) is not None:
            raise UnsupportedModelError(
                f"block {i} has a {type(blk.attn).__name__} attention; only timm's plain (ungated) Attention is "
                f"supported; {_PLAIN_VIT}")
        if not hasattr(blk.attn, "norm"):  # timm < 1.0.16 has no output norm (scale_norm): an identity
            blk.attn.norm = nn.Identity()
        blk.attn.__class__ = ReducingAttention
        blk.attn.prop_attn = prop_attn
        blk.__class__ = ReducingBlock
        blk.token_reducer = None
    model.__class__ = _reducing_class(type(model))
    return model


def set_token_reducers(model: nn.Module, reducers: list[TokenReducer | None]) -> None:
    if len(reducers) != len(model.blocks):
        raise ValueError(f"{len(reducers)} reducers for {len(model.blocks)} blocks")
    for blk, red in zip(model.blocks, reducers):
        blk.token_reducer = red


def num_input_tokens(model: VisionTransformer) -> int:
    return model.patch_embed.num_patches + model.num_prefix_tokens
