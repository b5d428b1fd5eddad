"""Token merging (ToMe, Bolya et al. 2023) as the PYRA code uses it (spec section 2).

In a block with ``r > 0`` the tokens are merged *after the attention residual and before the MLP* (the
official code; ``backbone.merge_site=before_attention`` merges the block's input before its attention
instead, see :mod:`pyra_bench.models.vit`):

* metric: the block's attention keys averaged over heads, L2-normalised (cosine similarity); merged before
  the attention, where the block has no keys yet, the tokens themselves (the paper's Eq. 3);
* bipartite split (``split``): ``alternate`` (the official code): A = tokens 0, 2, 4, ..., B = tokens 1, 3,
  5, ...; ``random`` (the paper's text, Eq. 2): in training every forward draws, per image, a random
  partition of the non-prefix tokens (equal sizes as alternate); in eval the split is ``alternate``, so
  test accuracy and measured speed are deterministic;
* the ``num_protected`` leading (prefix) tokens -- class, distillation, register tokens -- never merge:
  those in A are never sources, those in B never receive a merge (for a class token: A[0]; a DeiT
  distillation token: B[0], as the official code);
* each A token picks its most similar B token; the ``r`` A tokens with the highest similarity are merged
  into their partners (sources ordered by descending similarity), the rest of A is kept;
* output order: the prefix tokens first, in their original order, then the kept A tokens, then B;
* size-weighted average: ``x = sum(s * x) / sum(s)``, sizes add; the next attention adds ``log(s)`` to
  the key logits (proportional attention, see :mod:`pyra_bench.models.vit`). Tokens that take part in no
  merge are passed through unchanged.

Everything is batched gather / scatter: no Python loop over tokens or images.
A *modulator* (PYRA, :mod:`pyra_bench.models.pyra`) may rewrite the size-weighted source tokens
``M_s`` given their pre-merge destinations ``M_t`` before the scatter.

**Source tracing** (ToMe's ``trace_source``, here as index maps): inside ``with trace_sources(model) as
trace:`` every forward records, block by block, which input patch each token holds (merged groups),
which patches were dropped and which sit in a fused (package) token, and PYRA's modulation strength
(:class:`SourceTrace`). Each reducer reports its own token moves (``TokenReducer.trace``); off (the
default, ``trace is None``) a reducer does no extra tensor work.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .variants import MERGE_VARIANTS, check_variant


class Matching(NamedTuple):
    unm_idx: torch.Tensor  # (B, nA - r, 1) kept A tokens (ascending, class token first)
    src_idx: torch.Tensor  # (B, r, 1) merged A tokens, by descending similarity
    dst_idx: torch.Tensor  # (B, r, 1) their B partners


def max_merge(num_tokens: int, num_protected: int) -> int:
    """Largest r a layer with ``num_tokens`` tokens (``num_protected`` of them never merged) can take."""
    return max(num_tokens - num_protected, 0) // 2


SPLITS = MERGE_VARIANTS["merge_split"]  # the official code's first


def prefix_split(num_protected: int) -> tuple[int, int]:
    """How many of the ``num_protected`` leading tokens fall in A (even indices) and in B (odd ones)."""
    return (num_protected + 1) // 2, num_protected // 2


@torch.no_grad()
def bipartite_matching(metric: torch.Tensor, r: int, num_protected: int = 1) -> Matching:
    """ToMe's bipartite soft matching on ``metric`` (B, N, C), alternate split, the ``num_protected``
    leading tokens never merged. ``r`` must already be feasible."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    pa, pb = prefix_split(num_protected)
    if pa:
        scores[:, :pa, :] = -math.inf
    if pb:
        scores[:, :, :pb] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[:, r:]
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)
    if num_protected:
        unm_idx = unm_idx.sort(dim=1)[0]
    return Matching(unm_idx, src_idx, dst_idx)


def random_order(B: int, N: int, num_protected: int, device: torch.device | str) -> torch.Tensor:
    """(B, N) long: the prefix tokens in place, the others in a random order per image (the random split:
    after this permutation the alternate split is a uniformly random partition of the non-prefix tokens)."""
    front = torch.arange(num_protected, device=device).expand(B, num_protected)
    rest = torch.rand(B, N - num_protected, device=device).argsort(dim=1) + num_protected
    return torch.cat([front, rest], dim=1)


def _prefix_first(a: torch.Tensor, b: torch.Tensor, pa: int, pb: int) -> torch.Tensor:
    """``[a, b]`` (kept A, then B) with the ``pa`` + ``pb`` prefix tokens moved to the front, interleaved in
    their original order (A0, B0, A1, B1, ...)."""
    if not pb:
        return torch.cat([a, b], dim=1)
    pre = torch.stack([a[:, :pb], b[:, :pb]], dim=2).flatten(1, 2)
    return torch.cat([pre, a[:, pb:pa], a[:, pa:], b[:, pb:]], dim=1)


def merge_wavg(
    x: torch.Tensor,
    size: torch.Tensor | None,
    m: Matching,
    modulator: nn.Module | None = None,
    num_protected: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ``x`` (B, N, D) under matching ``m``; returns the new ``(x, size)``.

    ``size`` (B, N, 1) is None before the first merge (all ones). Only what changes is computed: kept A
    tokens are gathered as they are (ToMe's ``x * s / s`` round trip would only add rounding), each B token
    becomes ``(s_b x_b + sum of its sources' s x) / (s_b + sum of their s)``, and the sizes travel as their
    own (B, N, 1) tensor. Without autograd (inference) the result is written straight into one preallocated
    output (no concatenation); with autograd, or under ``torch.compile`` (whose graphs take no ``out=``
    arguments; inductor fuses the concatenation itself), the same arithmetic runs out of place.
    """
    B, N, D = x.shape
    n_unm, r = m.unm_idx.shape[1], m.src_idx.shape[1]
    if size is None:
        size = x.new_ones(B, N, 1)
    xa, xb = x[:, ::2], x[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    src_idx, dst_idx = m.src_idx.expand(B, r, D), m.dst_idx.expand(B, r, D)
    s_src = sa.gather(1, m.src_idx)
    s = xa.gather(1, src_idx) * s_src  # size-weighted sources, by descending similarity
    s_unm, s_dst = sa.gather(1, m.unm_idx), sb.scatter_add(1, m.dst_idx, s_src)
    pa, pb = prefix_split(num_protected)
    inplace = not torch.is_grad_enabled() and not pb and not torch.compiler.is_compiling()
    if inplace:
        out = x.new_empty(B, n_unm + xb.shape[1], D)
        torch.gather(xa, 1, m.unm_idx.expand(B, n_unm, D), out=out[:, :n_unm])
        dst = torch.mul(xb, sb, out=out[:, n_unm:])
    else:
        unm = xa.gather(1, m.unm_idx.expand(B, n_unm, D))
        dst = xb * sb
    if modulator is not None:
        s = modulator(s, dst.gather(1, dst_idx))
    if inplace:
        dst.scatter_add_(1, dst_idx, s).div_(s_dst)
        return out, torch.cat([s_unm, s_dst], dim=1)
    dst = dst.scatter_add(1, dst_idx, s) / s_dst
    return _prefix_first(unm, dst, pa, pb), _prefix_first(s_unm, s_dst, pa, pb)


# ---------------------------------------------------------------------------------------------------------
# Source tracing
# ---------------------------------------------------------------------------------------------------------
@dataclass
class BlockSources:
    """Where the input patches are after one block (``B`` images, ``P`` input patches, ``tokens`` tokens out).

    ``groups`` (B, P) long: the index of the token holding each patch (prefix tokens included in the
    numbering), -1 for a dropped patch. ``fused`` (B, P) bool: the patch is held by a fused token (an
    EViT-style package of dropped tokens). ``modulation`` (B, P) float or None: in this block's merge,
    the modulation strength (mean over channels of the gate) of the merged source token that held the
    patch, NaN where the patch was in no modulated source; None where the block modulates nothing.
    """

    tokens: int
    groups: torch.Tensor
    fused: torch.Tensor
    modulation: torch.Tensor | None = None


class SourceTrace:
    """Which input patches each token holds, block by block, for the last forward of a model.

    Filled by :func:`trace_sources`; ``blocks[l]`` is a :class:`BlockSources` after block ``l``. Reducers
    call :meth:`move` (tokens moved, merged or dropped) and :meth:`modulate` (before their move).
    """

    def __init__(self, num_prefix: int):
        self.num_prefix = int(num_prefix)
        self.blocks: list[BlockSources] = []

    def start(self, x: torch.Tensor) -> None:
        """A new forward: every patch is its own token (``x``: the first block's input, (B, N, D))."""
        B, N = x.shape[:2]
        P = N - self.num_prefix
        self.blocks = []
        self._groups = torch.arange(self.num_prefix, N, device=x.device).expand(B, P).clone()
        self._fused = torch.zeros(B, P, dtype=torch.bool, device=x.device)
        self._modulation: torch.Tensor | None = None

    def move(self, new_of_old: torch.Tensor, fused_token: int | None = None) -> None:
        """Token ``i`` before becomes token ``new_of_old[:, i]`` (B, N_old) after (-1: dropped); several
        old tokens with one new index are merged. ``fused_token``: the new index of a fused token."""
        held = self._groups >= 0
        moved = new_of_old.gather(1, self._groups.clamp_min(0))
        self._groups = torch.where(held, moved, -1)
        if fused_token is not None:
            self._fused |= self._groups == fused_token

    def modulate(self, strength: torch.Tensor) -> None:
        """The modulation strength per token before this block's move (B, N_old), NaN where unmodulated."""
        held = self._groups >= 0
        s = strength.float().gather(1, self._groups.clamp_min(0))
        self._modulation = torch.where(held, s, torch.nan)

    def end_block(self, tokens: int) -> None:
        self.blocks.append(BlockSources(int(tokens), self._groups.clone(), self._fused.clone(), self._modulation))
        self._modulation = None


@contextlib.contextmanager
def trace_sources(model: nn.Module) -> Iterator[SourceTrace]:
    """Trace the sources of every forward of a token-reducing ViT (:func:`pyra_bench.models.vit.patch_vit`)
    while the context is open; the trace holds the last forward. Hooks and reducer slots are cleared on
    exit, so an untraced forward runs exactly the code it ran before."""
    trace = SourceTrace(model.num_prefix_tokens + int(getattr(model, "num_prompt_tokens", 0)))  # + VPT's prompts
    blocks = list(model.blocks)
    handles = [blocks[0].register_forward_pre_hook(lambda m, args: trace.start(args[0]))]
    handles += [blk.register_forward_hook(lambda m, args, out: trace.end_block(out[0].shape[1])) for blk in blocks]
    reducers = [blk.token_reducer for blk in blocks if getattr(blk, "token_reducer", None) is not None]
    for red in reducers:
        red.trace = trace
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()
        for red in reducers:
            del red.trace  # back to the class default (None)


class TokenReducer(nn.Module):
    """Base class of the per-block token reduction step between attention and MLP.

    ``forward(x, size, q, k)`` gets the block's residual stream ``x`` (B, N, D), the token sizes (or None)
    and the attention's queries and keys (B, H, N, head_dim), and returns the new ``(x, size)``.
    ``tokens_out(n)`` tells the token count it leaves for ``n`` input tokens (used for schedule checks,
    FLOP estimates and tests). ``trace``: a :class:`SourceTrace` to report token moves to, set only inside
    :func:`trace_sources` (None otherwise: no tracing work). ``sites``: where in a block it can run
    (``before_attention`` reducers are called with ``q = k = None``, before the block has keys).
    """

    trace: SourceTrace | None = None
    sites: tuple[str, ...] = ("after_attention",)

    def tokens_out(self, n: int) -> int:
        raise NotImplementedError


class ToMeMerge(TokenReducer):
    """Merge ``r`` tokens per image (ToMe), optionally modulating the merged sources (PYRA).

    ``num_protected``: the leading (prefix) tokens that never merge; ``split``: ``alternate`` or ``random``
    (random in training only, see the module docstring). Called before the attention (``k`` None), the
    metric is the tokens themselves.
    """

    sites = MERGE_VARIANTS["merge_site"]

    def __init__(self, r: int, num_protected: int = 1, modulator: nn.Module | None = None,
                 split: str = "alternate"):
        super().__init__()
        if isinstance(num_protected, bool) or int(num_protected) < 0:
            raise TypeError(f"num_protected is a count of leading tokens (int >= 0), got {num_protected!r}")
        check_variant("merge_split", split)
        self.r = int(r)
        self.num_protected = int(num_protected)
        self.modulator = modulator
        self.split = split

    def tokens_out(self, n: int) -> int:
        return n - min(self.r, max_merge(n, self.num_protected))

    def forward(self, x, size, q, k):
        r = min(self.r, max_merge(x.shape[1], self.num_protected))
        if r <= 0:
            return x, size
        metric = x if k is None else k.mean(dim=1)  # (B, N, C): keys averaged over heads (or the tokens)
        order = None
        if self.split == "random" and self.training:
            B, N, D = x.shape
            order = random_order(B, N, self.num_protected, x.device)
            x = x.gather(1, order[..., None].expand(B, N, D))
            metric = metric.gather(1, order[..., None].expand(B, N, metric.shape[-1]))
            size = None if size is None else size.gather(1, order[..., None])
        m = bipartite_matching(metric, r, self.num_protected)
        if self.trace is not None:
            self._trace(x, size, m, order)
        return merge_wavg(x, size, m, self.modulator, self.num_protected)

    @torch.no_grad()
    def _trace(self, x: torch.Tensor, size: torch.Tensor | None, m: Matching, order: torch.Tensor | None) -> None:
        """Report the merge of matching ``m`` (and, with a modulator, its strength) to ``self.trace``;
        ``order``: the random split's permutation of the input tokens (None: alternate)."""
        B, N, D = x.shape
        n_unm, r, n_b = m.unm_idx.shape[1], m.src_idx.shape[1], N // 2
        ar = torch.arange(N, device=x.device).expand(B, N)
        new_a = torch.empty(B, N - n_b, dtype=torch.long, device=x.device)
        new_a.scatter_(1, m.unm_idx[..., 0], ar[:, :n_unm])
        new_a.scatter_(1, m.src_idx[..., 0], n_unm + m.dst_idx[..., 0])
        new_of_old = torch.empty(B, N, dtype=torch.long, device=x.device)
        new_of_old[:, ::2], new_of_old[:, 1::2] = new_a, n_unm + ar[:, :n_b]
        pa, pb = prefix_split(self.num_protected)
        if pb:  # output order: the prefix tokens (interleaved), the rest of A, the rest of B
            cat_at = _prefix_first(ar[:1, :n_unm, None], ar[:1, n_unm:n_unm + n_b, None], pa, pb)[0, :, 0]
            new_of_cat = torch.empty_like(cat_at).scatter_(0, cat_at, torch.arange(len(cat_at), device=x.device))
            new_of_old = new_of_cat[new_of_old]
        if order is not None:  # back to the input order
            new_of_old = torch.empty_like(new_of_old).scatter_(1, order, new_of_old)
        if self.modulator is not None:
            s_all = x.new_ones(B, N, 1) if size is None else size
            s_src = s_all[:, ::2].gather(1, m.src_idx)
            src = x[:, ::2].gather(1, m.src_idx.expand(B, r, D)) * s_src
            dst = (x[:, 1::2] * s_all[:, 1::2]).gather(1, m.dst_idx.expand(B, r, D))
            strength = torch.broadcast_to(self.modulator.gate(src, dst).mean(dim=-1), (B, r))
            per_token = torch.full((B, N), math.nan, device=x.device)
            per_token[:, ::2] = per_token[:, ::2].scatter(1, m.src_idx[..., 0], strength.float())
            if order is not None:
                per_token = torch.empty_like(per_token).scatter_(1, order, per_token)
            self.trace.modulate(per_token)
        self.trace.move(new_of_old)

    def extra_repr(self) -> str:
        split = "" if self.split == "alternate" else f", split={self.split}"
        return f"r={self.r}, protected={self.num_protected}{split}"
