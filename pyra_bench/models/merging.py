"""Token merging (ToMe, Bolya et al. 2023) as the PYRA code uses it (spec section 2).

In a block with ``r > 0`` the tokens are merged *after the attention residual and before the MLP*:

* metric: the block's attention keys averaged over heads, L2-normalised (cosine similarity);
* bipartite split by parity: A = tokens 0, 2, 4, ..., B = tokens 1, 3, 5, ...;
  the class token (A[0]) never merges, a DeiT distillation token (B[0]) never receives a merge;
* each A token picks its most similar B token; the ``r`` A tokens with the highest similarity are merged
  into their partners (sources ordered by descending similarity), the rest of A is kept;
* output order: kept A tokens (class token first), then B (distillation token kept second);
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


class Matching(NamedTuple):
    unm_idx: torch.Tensor  # (B, nA - r, 1) kept A tokens (ascending, class token first)
    src_idx: torch.Tensor  # (B, r, 1) merged A tokens, by descending similarity
    dst_idx: torch.Tensor  # (B, r, 1) their B partners


def max_merge(num_tokens: int, num_protected: int) -> int:
    """Largest r a layer with ``num_tokens`` tokens (``num_protected`` of them never merged) can take."""
    return max(num_tokens - num_protected, 0) // 2


@torch.no_grad()
def bipartite_matching(metric: torch.Tensor, r: int, class_token: bool = True, distill_token: bool = False) -> Matching:
    """ToMe's bipartite soft matching on ``metric`` (B, N, C). ``r`` must already be feasible."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if class_token:
        scores[:, 0, :] = -math.inf
    if distill_token:
        scores[:, :, 0] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[:, r:]
    src_idx = edge_idx[:, :r]
    dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)
    if class_token:
        unm_idx = unm_idx.sort(dim=1)[0]
    return Matching(unm_idx, src_idx, dst_idx)


def merge_wavg(
    x: torch.Tensor,
    size: torch.Tensor | None,
    m: Matching,
    modulator: nn.Module | None = None,
    distill_token: bool = False,
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
    inplace = not torch.is_grad_enabled() and not distill_token and not torch.compiler.is_compiling()
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
    if distill_token:  # class token, distillation token, then the rest of A and of B
        return (torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1),
                torch.cat([s_unm[:, :1], s_dst[:, :1], s_unm[:, 1:], s_dst[:, 1:]], dim=1))
    return torch.cat([unm, dst], dim=1), torch.cat([s_unm, s_dst], dim=1)


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
    trace = SourceTrace(model.num_prefix_tokens)
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
    :func:`trace_sources` (None otherwise: no tracing work).
    """

    trace: SourceTrace | None = None

    def tokens_out(self, n: int) -> int:
        raise NotImplementedError


class ToMeMerge(TokenReducer):
    """Merge ``r`` tokens per image (ToMe), optionally modulating the merged sources (PYRA)."""

    def __init__(self, r: int, class_token: bool = True, distill_token: bool = False, modulator: nn.Module | None = None):
        super().__init__()
        self.r = int(r)
        self.class_token = class_token
        self.distill_token = distill_token
        self.num_protected = int(class_token) + int(distill_token)
        self.modulator = modulator

    def tokens_out(self, n: int) -> int:
        return n - min(self.r, max_merge(n, self.num_protected))

    def forward(self, x, size, q, k):
        r = min(self.r, max_merge(x.shape[1], self.num_protected))
        if r <= 0:
            return x, size
        metric = k.mean(dim=1)  # (B, N, head_dim): keys averaged over heads
        m = bipartite_matching(metric, r, self.class_token, self.distill_token)
        if self.trace is not None:
            self._trace(x, size, m)
        return merge_wavg(x, size, m, self.modulator, self.distill_token)

    @torch.no_grad()
    def _trace(self, x: torch.Tensor, size: torch.Tensor | None, m: Matching) -> None:
        """Report the merge of matching ``m`` (and, with a modulator, its strength) to ``self.trace``."""
        B, N, D = x.shape
        n_unm, r, n_b = m.unm_idx.shape[1], m.src_idx.shape[1], N // 2
        ar = torch.arange(N, device=x.device).expand(B, N)
        new_a = torch.empty(B, N - n_b, dtype=torch.long, device=x.device)
        new_a.scatter_(1, m.unm_idx[..., 0], ar[:, :n_unm])
        new_a.scatter_(1, m.src_idx[..., 0], n_unm + m.dst_idx[..., 0])
        new_of_old = torch.empty(B, N, dtype=torch.long, device=x.device)
        new_of_old[:, ::2], new_of_old[:, 1::2] = new_a, n_unm + ar[:, :n_b]
        if self.distill_token:  # output order: class, distillation, the rest of A, the rest of B
            c = new_of_old
            new_of_old = torch.where(c == n_unm, 1, torch.where((c > 0) & (c < n_unm), c + 1, c))
        if self.modulator is not None:
            s_all = x.new_ones(B, N, 1) if size is None else size
            s_src = s_all[:, ::2].gather(1, m.src_idx)
            src = x[:, ::2].gather(1, m.src_idx.expand(B, r, D)) * s_src
            dst = (x[:, 1::2] * s_all[:, 1::2]).gather(1, m.dst_idx.expand(B, r, D))
            strength = torch.broadcast_to(self.modulator.gate(src, dst).mean(dim=-1), (B, r))
            per_token = torch.full((B, N), math.nan, device=x.device)
            per_token[:, ::2] = per_token[:, ::2].scatter(1, m.src_idx[..., 0], strength.float())
            self.trace.modulate(per_token)
        self.trace.move(new_of_old)

    def extra_repr(self) -> str:
        return f"r={self.r}, protected={self.num_protected}"
