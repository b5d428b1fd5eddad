"""Analytic multiply-accumulate counts of a (token-reducing, possibly channel-pruned) ViT.

Used for FLOPs budgets (the baselines' "low"/"high" operating points are MAC fractions) and as an
independent cross-check of the measured counters in :mod:`pyra_bench.measure`. Counts the matmuls only
(patch embedding, qkv, q@k^T, attn@v, proj, MLP, head), the convention of fvcore's "FLOPs":
ViT-B/16 at 224 = 17.56 G MACs.

In a block the attention runs on the tokens entering it (``n_in``) and the MLP on the tokens left after
the block's reduction (``n_out``), because merging happens between the two (spec section 2); a block that
merges before its attention (``backbone.merge_site=before_attention``) runs both on ``n_out``.

The PEFT choices that do not fold into the weights (:mod:`pyra_bench.models.peft`) are counted too: an
adapter adds ``2 * n_out * D * d`` per block (its two matmuls, on the MLP's tokens), VPT's prompt tokens
are tokens of every block (``num_tokens`` includes them), and prefix tuning's ``P`` keys and values add
``2 * n_in * P * attn_dim`` per attention (``q @ k^T`` and ``attn @ v`` over ``n_in + P`` keys).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import ConfigError

#: The paper's operating points as fractions of the uncompressed backbone's MACs (spec section 8).
BUDGETS = {"low": 0.50, "high": 0.29}


class BudgetError(ConfigError):
    """A FLOPs or speed target the method cannot reach on this backbone (the message says what can be)."""


def block_macs(n_in: int, n_out: int, dim: int, attn_dim: int, mlp_hidden: int, adapter_dim: int = 0,
               extra_keys: int = 0) -> int:
    """One block: qkv, ``q @ k^T`` and ``attn @ v`` (over ``n_in + extra_keys`` keys: prefix tuning), proj on
    ``n_in`` tokens; the MLP (and an adapter of bottleneck ``adapter_dim``) on ``n_out``."""
    attn = n_in * dim * 3 * attn_dim + 2 * n_in * (n_in + extra_keys) * attn_dim + n_in * attn_dim * dim
    mlp = 2 * n_out * dim * mlp_hidden + 2 * n_out * dim * adapter_dim
    return attn + mlp


def vit_macs(tokens_in: Sequence[int], tokens_out: Sequence[int], dim: int, attn_dims: Sequence[int],
             mlp_hiddens: Sequence[int], num_patches: int, patch_dim: int, num_classes: int = 0,
             num_heads_out: int = 1, adapter_dims: Sequence[int] = (), extra_keys: int = 0) -> int:
    total = num_patches * patch_dim * dim  # patch embedding
    adapters = list(adapter_dims) or [0] * len(attn_dims)
    for n_in, n_out, a, h, d in zip(tokens_in, tokens_out, attn_dims, mlp_hiddens, adapters):
        total += block_macs(n_in, n_out, dim, a, h, d, extra_keys)
    return total + num_heads_out * dim * num_classes


@dataclass(frozen=True)
class ViTGeometry:
    """The matmul shape of a (patched, unreduced) ViT: enough to count the MACs of any token schedule."""

    num_tokens: int  # tokens entering block 0 (patches + prefix tokens + VPT's prompt tokens)
    num_patches: int
    patch_dim: int  # in_chans * patch_h * patch_w
    dim: int
    attn_dims: tuple[int, ...]  # qkv width / 3, per block
    mlp_hiddens: tuple[int, ...]  # fc1 width, per block
    #: blocks merge before their attention (not in the repr: speed-cache keys of the default stay valid)
    merge_before_attention: bool = field(default=False, repr=False)
    #: adapter bottlenecks per block (empty: none) and prefix tuning's keys per attention (PEFT; not in the
    #: repr either: the timed speed targets build the model without them)
    adapter_dims: tuple[int, ...] = field(default=(), repr=False)
    extra_keys: int = field(default=0, repr=False)

    @classmethod
    def from_model(cls, model: nn.Module) -> ViTGeometry:
        """The geometry of ``model`` as it is (PEFT modules included when they are there)."""
        pe = model.patch_embed
        return cls(pe.num_patches + model.num_prefix_tokens + int(getattr(model, "num_prompt_tokens", 0)),
                   pe.num_patches, pe.proj.in_channels * pe.proj.kernel_size[0] * pe.proj.kernel_size[1],
                   model.embed_dim, tuple(blk.attn.qkv.out_features // 3 for blk in model.blocks),
                   tuple(blk.mlp.fc1.out_features for blk in model.blocks),
                   bool(getattr(model.blocks[0], "merge_before_attention", False)),
                   _adapter_dims(model), _extra_keys(model))

    @property
    def depth(self) -> int:
        return len(self.attn_dims)

    def macs(self, schedule: Sequence[int] | None = None) -> int:
        """MACs of one image when block ``l`` merges ``schedule[l]`` tokens (between attention and MLP)."""
        t_in, t_out, n = [], [], self.num_tokens
        for r in schedule if schedule is not None else [0] * self.depth:
            t_in.append(n - int(r) if self.merge_before_attention else n)
            n -= int(r)
            t_out.append(n)
        return vit_macs(t_in, t_out, self.dim, self.attn_dims, self.mlp_hiddens, self.num_patches, self.patch_dim,
                        adapter_dims=self.adapter_dims, extra_keys=self.extra_keys)

    def fraction(self, schedule: Sequence[int]) -> float:
        """MACs with ``schedule`` / MACs without merging."""
        return self.macs(schedule) / self.macs()


def _adapter_dims(model: nn.Module) -> tuple[int, ...]:
    dims = tuple(int(getattr(getattr(blk, "adapter", None), "bottleneck", 0)) for blk in model.blocks)
    return dims if any(dims) else ()


def _extra_keys(model: nn.Module) -> int:
    return int(getattr(getattr(model.blocks[0].attn, "prefix", None), "num_tokens", 0))


def model_macs(model: nn.Module, include_head: bool = False) -> int:
    """MACs of one image through ``model`` (a timm ViT, patched or not), from its current structure (PEFT
    modules that stay in the inference model included: adapters, VPT's prompts, prefix keys/values)."""
    pe = model.patch_embed
    num_patches = pe.num_patches
    patch_dim = pe.proj.in_channels * pe.proj.kernel_size[0] * pe.proj.kernel_size[1]
    n = num_patches + model.num_prefix_tokens + int(getattr(model, "num_prompt_tokens", 0))
    t_in, t_out, attn_dims, hiddens = [], [], [], []
    extra = 0
    for blk in model.blocks:
        red = getattr(blk, "token_reducer", None)
        before = red is not None and getattr(blk, "merge_before_attention", False)
        t_in.append(red.tokens_out(n) if before else n)
        if red is not None:
            extra += int(getattr(red, "extra_macs", lambda _n: 0)(n))  # e.g. SPViT's selector MLPs
            n = red.tokens_out(n)
        t_out.append(n)
        attn_dims.append(blk.attn.qkv.out_features // 3)
        hiddens.append(blk.mlp.fc1.out_features)
    heads = 2 if getattr(model, "dist_token", None) is not None else 1
    nc = getattr(model, "num_classes", 0) if include_head else 0
    return extra + vit_macs(t_in, t_out, model.embed_dim, attn_dims, hiddens, num_patches, patch_dim, nc, heads,
                            adapter_dims=_adapter_dims(model), extra_keys=_extra_keys(model))


def _number(text: str, spec: Any, form: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"cannot read {spec!r}: expected {form}") from None


def budget_fraction(spec: str | float) -> float:
    """``"low"``/``"high"``, a float in (0, 1], or ``"flops:0.4"`` -> target fraction of the backbone's MACs."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        f = float(spec)
    elif isinstance(spec, str) and spec in BUDGETS:
        f = BUDGETS[spec]
    elif isinstance(spec, str) and spec.startswith("flops:"):
        f = _number(spec[6:], spec, "'flops:<fraction of the backbone's MACs>', e.g. flops:0.4")
    else:
        raise ConfigError(f"unknown FLOPs budget {spec!r}; valid: {', '.join(BUDGETS)}, a fraction in (0, 1], or "
                          "'flops:<fraction>' (e.g. flops:0.4)")
    if not 0 < f <= 1:
        raise ConfigError(f"a FLOPs budget is a fraction of the backbone's MACs in (0, 1], got {spec!r}")
    return f


def operating_point(spec: Any) -> tuple[str, float] | None:
    """A target operating point: ``"flops:<f>"`` -> ``("flops", f)``, ``"speedup:<x>"`` -> ``("speedup", x)``
    (x > 1 times the unmerged model's measured throughput); any other form -> None (a schedule)."""
    if not isinstance(spec, str):
        return None
    s = spec.strip()
    if s.startswith("flops:"):
        return "flops", budget_fraction(s)
    if s.startswith("speedup:"):
        x = _number(s[8:], spec, "'speedup:<x>', x times the unmerged model's throughput, e.g. speedup:2")
        if not x >= 1:
            raise ConfigError(f"a speedup target is at least 1 (times the unmerged model's throughput), got {spec!r}")
        return "speedup", x
    return None
