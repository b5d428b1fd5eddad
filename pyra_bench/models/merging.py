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
"""

from __future__ import annotations

import math
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


class TokenReducer(nn.Module):
    """Base class of the per-block token reduction step between attention and MLP.

    ``forward(x, size, q, k)`` gets the block's residual stream ``x`` (B, N, D), the token sizes (or None)
    and the attention's queries and keys (B, H, N, head_dim), and returns the new ``(x, size)``.
    ``tokens_out(n)`` tells the token count it leaves for ``n`` input tokens (used for schedule checks,
    FLOP estimates and tests).
    """

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
        return merge_wavg(x, size, m, self.modulator, self.distill_token)

    def extra_repr(self) -> str:
        return f"r={self.r}, protected={self.num_protected}"
