"""A small patch that turns a timm ``VisionTransformer`` into one whose blocks can reduce tokens.

In ToMe's style the host model stays a timm model: its modules and weights are untouched, only the
classes of the attention, the blocks and the model are swapped for subclasses whose ``forward`` threads
token *sizes* through the blocks:

* :class:`ReducingAttention`: timm's attention on ``torch.nn.functional.scaled_dot_product_attention``,
  with proportional attention entering as an additive ``log(size)`` bias on the keys; it also returns
  ``q`` and ``k`` (references, nothing extra is computed) for the block's token reducer.
* :class:`ReducingBlock`: ``x = x + ls1(attn(norm1(x))); x, size = token_reducer(x, size, q, k);
  x = x + ls2(mlp(norm2(x)))`` -- merging happens between attention and MLP (spec section 2; layer scale
  ``ls1``/``ls2``, DINOv2, is timm's own). ``merge_site="before_attention"`` (the paper's Fig. 3 reading,
  ``backbone.merge_site``) calls the reducer on the block's input instead, before ``norm1``, with no keys
  (``q = k = None``): ToMe then matches on the tokens themselves (the paper's Eq. 3).
* the model's ``forward_tokens`` loops over the blocks carrying ``size`` (after timm's ``norm_pre``, the
  CLIP pre-norm) and returns the tokens and their sizes; ``forward`` then uses timm's head, except that a
  global-average-pool head (``global_pool='avg'``) averages the merged tokens *size-weighted*
  (:meth:`~ReducingViTMixin.pool_sized`: a token of size s counts s times), over the tokens timm's pool
  reads (prefix tokens excluded unless ``pool_include_prefix``). ``forward_features`` is timm's signature
  (tokens only): code that pools its output itself must use ``forward_tokens`` + ``pool_sized``.

Prefix tokens (class, distillation, registers: timm's ``num_prefix_tokens``, always the leading tokens) are
protected from merging and pruning as one count, :func:`num_protected_tokens`. With no reducer in any
block the patched model computes exactly timm's function.

The PEFT choices beside LoRA (:mod:`pyra_bench.models.peft`) hook in at three slots, each None unless
used: ``block.prompts`` (VPT-deep: ``model.num_prompt_tokens`` slots after the prefix tokens, written by
every block, protected, dropped before the final norm), ``block.adapter`` (on the MLP branch) and
``attn.prefix`` (prefix tuning's keys and values, appended to the keys and values only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from ..errors import UnsupportedModelError
from .merging import TokenReducer
from .variants import MERGE_VARIANTS, check_variant

_PLAIN_VIT = ("use a timm VisionTransformer with timm's Block and Attention and a class-token or average-pool "
              "head (e.g. the registered backbones: pyra_bench.models.BACKBONES)")
#: where in a block the token reducer runs (``backbone.merge_site``); the first is the official code's
MERGE_SITES = MERGE_VARIANTS["merge_site"]
#: heads whose pooling the patch handles (``global_pool``): the class token, a size-weighted average
POOLS = ("token", "avg")


class ReducingAttention(Attention):
    prop_attn: bool = True
    #: prefix tuning's learned keys and values (:class:`pyra_bench.models.peft.PrefixKV`), or None (an
    #: instance attribute set by :func:`patch_vit`: a class default would shadow a registered module)
    prefix: nn.Module | None

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None):  # type: ignore[override]
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None
        if size is not None and self.prop_attn:
            bias = size.log().to(q.dtype).view(B, 1, 1, N)
        keys, values = k, v
        if self.prefix is not None:  # prefix tuning: extra keys/values, size 1 (bias 0); the reducer sees k
            keys, values, bias = self.prefix.extend(k, v, bias)
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0
        )
        out = self.norm(out.transpose(1, 2).reshape(B, N, -1))
        return self.proj_drop(self.proj(out)), q, k


class ReducingBlock(Block):
    token_reducer: TokenReducer | None
    merge_before_attention: bool = False
    #: PEFT modules (:mod:`pyra_bench.models.peft`), None when not used: VPT-deep's prompts (replace the
    #: prompt tokens of the input), an adapter on the MLP branch (``x + adapter(drop_path2(ls2(mlp(..))))``)
    prompts: nn.Module | None
    adapter: nn.Module | None

    def forward(self, x: torch.Tensor, size: torch.Tensor | None = None):  # type: ignore[override]
        red = self.token_reducer
        if self.prompts is not None:
            x = self.prompts(x)
        if red is not None and self.merge_before_attention:
            x, size = red(x, size, None, None)
        x_attn, q, k = self.attn(self.norm1(x), size)
        x = x + self.drop_path1(self.ls1(x_attn))
        if red is not None and not self.merge_before_attention:
            x, size = red(x, size, q, k)
        h = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        x = x + (h if self.adapter is None else self.adapter(h))
        return x, size


class ReducingViTMixin:
    """Mixed in front of the host model's class (VisionTransformer or a subclass such as DeiT-distilled)."""

    #: VPT-deep's prompt tokens, after the prefix tokens in every block (each block writes its own)
    num_prompt_tokens: int = 0

    def forward_tokens(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The final-normed tokens and their sizes (None when nothing merged); prompt tokens (VPT) are
        inserted after the prefix tokens before block 0 and dropped after the last block. timm's attention
        mask arguments are refused: a mask cannot follow tokens that merge."""
        if attn_mask is not None or is_causal:
            raise NotImplementedError("token-reducing ViTs do not take attention masks")
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        p, P = self.num_prefix_tokens, self.num_prompt_tokens
        if P:  # slots that every block's prompts overwrite
            x = torch.cat([x[:, :p], x.new_zeros(x.shape[0], P, x.shape[2]), x[:, p:]], dim=1)
        size = None
        for blk in self.blocks:
            x, size = blk(x, size)
        if P:
            x = torch.cat([x[:, :p], x[:, p + P:]], dim=1)
            size = None if size is None else torch.cat([size[:, :p], size[:, p + P:]], dim=1)
        return self.norm(x), size

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        return self.forward_tokens(x, attn_mask, is_causal)[0]

    def pool_sized(self, x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
        """timm's ``pool``, except that an average-pool head weighs each token by its size."""
        if size is None or self.global_pool != "avg":
            return self.pool(x)
        p = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        x, size = x[:, p:], size[:, p:].to(x.dtype)
        return (x * size).sum(dim=1) / size.sum(dim=1)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        x, size = self.forward_tokens(x, attn_mask, is_causal)
        if size is None or self.global_pool != "avg":  # timm's head (DeiT-distilled: its own)
            return self.forward_head(x)
        x = self.head_drop(self.fc_norm(self.pool_sized(x, size)))
        return self.head(x)

    def token_reducers(self) -> list[TokenReducer | None]:
        return [blk.token_reducer for blk in self.blocks]


_CLASS_CACHE: dict[type, type] = {}


def _reducing_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"Reducing{cls.__name__}", (ReducingViTMixin, cls), {})
    return _CLASS_CACHE[cls]


def num_protected_tokens(model: VisionTransformer) -> int:
    """How many leading tokens never merge or get pruned: timm's prefix tokens (class, distillation and
    register tokens) and VPT's prompt tokens after them."""
    return int(model.num_prefix_tokens) + int(getattr(model, "num_prompt_tokens", 0))


def has_class_token(model: VisionTransformer) -> bool:
    """Whether token 0 is a class token (what class-attention methods read)."""
    return getattr(model, "cls_token", None) is not None


def patch_vit(model: VisionTransformer, prop_attn: bool = True, merge_site: str = "after_attention") -> VisionTransformer:
    """Patch ``model`` in place (idempotent; ``merge_site`` is set again). Refuses, by name, what the
    merge cannot handle."""
    check_variant("merge_site", merge_site)
    if isinstance(model, ReducingViTMixin):
        for blk in model.blocks:
            blk.merge_before_attention = merge_site == "before_attention"
        return model
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f"expected a timm VisionTransformer, got {type(model).__name__}; {_PLAIN_VIT}")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in POOLS:
        raise UnsupportedModelError(
            f"global_pool={model.global_pool!r} is not supported (merged tokens have sizes the pooling must "
            f"weigh); supported: {', '.join(POOLS)} (create the model with global_pool='token' or 'avg')")
    if model.global_pool == "token" and not has_class_token(model):
        raise UnsupportedModelError("global_pool='token' needs a class token; use global_pool='avg'")
    if getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError(f"dynamic_img_size=True is not supported (token counts are fixed per "
                                    f"backbone); {_PLAIN_VIT}")
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
        blk.attn.prefix = None
        blk.__class__ = ReducingBlock
        blk.token_reducer = None
        blk.prompts = blk.adapter = None
        blk.merge_before_attention = merge_site == "before_attention"
    model.__class__ = _reducing_class(type(model))
    return model


def set_token_reducers(model: nn.Module, reducers: list[TokenReducer | None]) -> None:
    if len(reducers) != len(model.blocks):
        raise ValueError(f"{len(reducers)} reducers for {len(model.blocks)} blocks")
    for i, (blk, red) in enumerate(zip(model.blocks, reducers)):
        if red is not None and getattr(blk, "merge_before_attention", False) and "before_attention" not in red.sites:
            raise UnsupportedModelError(
                f"block {i}: a {type(red).__name__} cannot run before the attention (backbone.merge_site="
                f"before_attention); it needs the block's queries and keys: use merge_site=after_attention")
        blk.token_reducer = red


def num_input_tokens(model: VisionTransformer) -> int:
    """Tokens entering block 0: patches, prefix tokens and VPT's prompt tokens."""
    return model.patch_embed.num_patches + num_protected_tokens(model)
