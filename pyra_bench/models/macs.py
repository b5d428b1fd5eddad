"""Analytic multiply-accumulate counts of a (token-reducing, possibly channel-pruned) ViT.

Used for FLOPs budgets (the baselines' "low"/"high" operating points are MAC fractions) and as an
independent cross-check of the measured counters in :mod:`pyra_bench.measure`. Counts the matmuls only
(patch embedding, qkv, q@k^T, attn@v, proj, MLP, head), the convention of fvcore's "FLOPs":
ViT-B/16 at 224 = 17.56 G MACs.

In a block the attention runs on the tokens entering it (``n_in``) and the MLP on the tokens left after
the block's reduction (``n_out``), because merging happens between the two (spec section 2).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

#: The paper's operating points as fractions of the uncompressed backbone's MACs (spec section 8).
BUDGETS = {"low": 0.50, "high": 0.29}


def block_macs(n_in: int, n_out: int, dim: int, attn_dim: int, mlp_hidden: int) -> int:
    attn = n_in * dim * 3 * attn_dim + 2 * n_in * n_in * attn_dim + n_in * attn_dim * dim
    mlp = 2 * n_out * dim * mlp_hidden
    return attn + mlp


def vit_macs(tokens_in: Sequence[int], tokens_out: Sequence[int], dim: int, attn_dims: Sequence[int],
             mlp_hiddens: Sequence[int], num_patches: int, patch_dim: int, num_classes: int = 0,
             num_heads_out: int = 1) -> int:
    total = num_patches * patch_dim * dim  # patch embedding
    for n_in, n_out, a, h in zip(tokens_in, tokens_out, attn_dims, mlp_hiddens):
        total += block_macs(n_in, n_out, dim, a, h)
    return total + num_heads_out * dim * num_classes


def model_macs(model: nn.Module, include_head: bool = False) -> int:
    """MACs of one image through ``model`` (a timm ViT, patched or not), from its current structure."""
    pe = model.patch_embed
    num_patches = pe.num_patches
    patch_dim = pe.proj.in_channels * pe.proj.kernel_size[0] * pe.proj.kernel_size[1]
    n = num_patches + model.num_prefix_tokens
    t_in, t_out, attn_dims, hiddens = [], [], [], []
    extra = 0
    for blk in model.blocks:
        t_in.append(n)
        red = getattr(blk, "token_reducer", None)
        if red is not None:
            extra += int(getattr(red, "extra_macs", lambda _n: 0)(n))  # e.g. SPViT's selector MLPs
            n = red.tokens_out(n)
        t_out.append(n)
        attn_dims.append(blk.attn.qkv.out_features // 3)
        hiddens.append(blk.mlp.fc1.out_features)
    heads = 2 if getattr(model, "dist_token", None) is not None else 1
    nc = getattr(model, "num_classes", 0) if include_head else 0
    return extra + vit_macs(t_in, t_out, model.embed_dim, attn_dims, hiddens, num_patches, patch_dim, nc, heads)


def budget_fraction(spec: str | float) -> float:
    """``"low"``/``"high"``, a float in (0, 1], or ``"flops:0.4"`` -> target fraction of the backbone's MACs."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        f = float(spec)
    elif isinstance(spec, str) and spec in BUDGETS:
        f = BUDGETS[spec]
    elif isinstance(spec, str) and spec.startswith("flops:"):
        f = float(spec[6:])
    else:
        raise ValueError(f"unknown FLOPs budget {spec!r}; valid: {', '.join(BUDGETS)}, a fraction, or 'flops:<fraction>'")
    if not 0 < f <= 1:
        raise ValueError(f"FLOPs budget must be in (0, 1], got {f}")
    return f
