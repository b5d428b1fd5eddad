"""EViT + LoRA: keep the tokens the class token attends to most, fuse the rest (Liang et al., ICLR 2022).

What the method does here (the official code, youweiliang/evit ``evit.py``, ``Attention``/``Block``)
---------------------------------------------------------------------------------------------------
* **Where.** In the blocks listed by ``locations`` (default: the official ``drop_loc`` (3, 6, 9) of 12
  blocks, i.e. the 4th, 7th and 10th; ``L//4, L//2, 3L//4`` for other depths), after the block's attention
  and before its MLP -- the reducer slot of :mod:`pyra_bench.models.vit`, where the official ``Block`` prunes.
* **Which.** The class token's attention to every other token, averaged over heads (the official
  ``attn[:, :, 0, 1:].mean(dim=1)``; computed here from the block's ``q``/``k`` for the class query only:
  :func:`pyra_bench.methods.diffrate.class_attention`). Of the ``n`` unprotected tokens (earlier fused tokens
  included, as in the official code) the ``ceil(keep_rate * n)`` most attended are kept, in the order of
  ``torch.topk(sorted=True)`` (descending attention), after the protected class (and distillation) tokens.
* **Fused token.** The others are fused into one token appended last: their sum weighted by their class
  attention (the official ``extra_token``, not renormalised). ``fuse_token=false``: they are dropped.
* **Operating point.** ``compression`` is a FLOPs budget (``low`` = 50 %, ``high`` = 29 % of the backbone's
  MACs, ``flops:<f>``): one keep rate at every location, the one whose analytic MACs
  (:func:`pyra_bench.models.macs.vit_macs`, fused tokens included) are closest to the budget; a budget below
  the reachable floor (every location keeping one token) is refused with the floor in the message.
  ``keep_rate`` (the official ``base_keep_rate``, e.g. 0.7) or ``keep_rates`` (one per block, 1 = no pruning)
  set the rates directly instead.

Deviations from the official code: no knowledge distillation and no keep-rate warm-up schedule (PYRA's
protocol trains every method the same way: LoRA + head with the recipe of ``conf/trainer/``); the class
attention is taken before attention dropout (the official code takes it after; the recipe has none).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from ..models.macs import vit_macs
from ..models.merging import TokenReducer
from ..models.vit import UnsupportedModelError, set_token_reducers
from . import options
from .base import METHODS, BuildContext, Method
from .diffrate import class_attention
from .spvit import BudgetError, parse_budget

#: keep rates tried when solving a budget (the token counts are whole, so the MACs move in steps anyway)
KEEP_RATE_GRID = tuple(i / 1000 for i in range(1, 1001))


def default_locations(depth: int) -> list[int]:
    """The official ``drop_loc`` (3, 6, 9) of 12 blocks, scaled: ``L//4, L//2, 3L//4`` (distinct)."""
    return sorted({depth // 4, depth // 2, 3 * depth // 4})


def kept_tokens(keep_rate: float, n: int) -> int:
    """Unprotected tokens a block keeps out of ``n`` (the official ``math.ceil(keep_rate * (N - 1))``)."""
    return n if keep_rate >= 1 else max(1, math.ceil(keep_rate * n))


def tokens_after(keep_rate: float, n: int, num_protected: int, fuse: bool) -> int:
    """Tokens a block leaves of ``n`` (protected ones included)."""
    cand = n - num_protected
    left = kept_tokens(keep_rate, cand)
    if left >= cand:
        return n
    return num_protected + left + int(fuse)


class EViTReducer(TokenReducer):
    """One block's EViT step: keep ``ceil(keep_rate * n)`` of the ``n`` unprotected tokens by class attention,
    fuse the others into one token (appended last)."""

    def __init__(self, keep_rate: float, num_protected: int = 1, fuse_token: bool = True):
        super().__init__()
        self.keep_rate, self.num_protected, self.fuse_token = float(keep_rate), int(num_protected), bool(fuse_token)

    def tokens_out(self, n: int) -> int:
        return tokens_after(self.keep_rate, n, self.num_protected, self.fuse_token)

    def forward(self, x, size, q, k):
        B, N, D = x.shape
        P = self.num_protected
        cand = N - P
        left = kept_tokens(self.keep_rate, cand)
        if left >= cand:
            return x, size
        attn = class_attention(q, k, size)[:, P:]  # (B, cand): the class token's attention, head-averaged
        top = attn.topk(left, dim=1, largest=True, sorted=True).indices  # (B, left), as the official code
        others = x[:, P:]
        parts = [x[:, :P], others.gather(1, top[..., None].expand(B, left, D))]
        sizes = None if size is None else [size[:, :P], size[:, P:].gather(1, top[..., None])]
        if self.fuse_token:
            dropped = torch.ones(B, cand, dtype=torch.bool, device=x.device).scatter_(1, top, False)
            w = (attn * dropped).to(x.dtype)[..., None]  # 0 on the kept tokens
            parts.append((w * others).sum(dim=1, keepdim=True))
            if sizes is not None:
                sizes.append((size[:, P:] * dropped[..., None]).sum(dim=1, keepdim=True))
        if self.trace is not None:
            self._trace(top, N)
        return torch.cat(parts, dim=1), None if sizes is None else torch.cat(sizes, dim=1)

    @torch.no_grad()
    def _trace(self, top: torch.Tensor, n: int) -> None:
        """Report to ``self.trace``: protected tokens stay, kept tokens in top-k order, the rest fused (or
        dropped)."""
        B, left = top.shape
        P = self.num_protected
        fused = P + left
        rest = torch.full((B, n - P), fused if self.fuse_token else -1, dtype=torch.long, device=top.device)
        rest.scatter_(1, top, torch.arange(P, P + left, device=top.device).expand(B, left))
        front = torch.arange(P, device=top.device).expand(B, P)
        self.trace.move(torch.cat([front, rest], dim=1), fused_token=fused if self.fuse_token else None)

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate:g}, protected={self.num_protected}, fuse_token={self.fuse_token}"


@METHODS.register("evit")
class EViTMethod(Method):
    """EViT + LoRA (see the module docstring). ``schedule``: ``low`` / ``high`` / ``flops:<f>`` / ``none``."""

    name = "evit"
    display_name = "EViT"
    cost_factor = 0.75  # GPU time of a run relative to PEFT (sweep estimates without records)
    options = options.EViT

    def __init__(self, schedule: Any = "low", **kwargs: Any):
        super().__init__(schedule, **kwargs)
        o = self.opts
        self.locations_opt, self.keep_rate_opt, self.keep_rates_opt = o.locations, o.keep_rate, o.keep_rates
        if self.locations_opt is not None and sorted(set(self.locations_opt)) != self.locations_opt:
            o.fail("locations", self.locations_opt, "a list of increasing block indices, e.g. [3, 6, 9]")
        self.fuse_token, self.budget_tolerance = o.fuse_token, o.budget_tolerance
        self.budget = parse_budget(schedule, self.name)  # the form, before any work (None: compression=none)
        self.keep_rates: list[float] = []
        self.macs_fraction = 1.0
        self.floor_fraction = 0.0

    # -- building -----------------------------------------------------------------------------------
    def _macs(self, rates: list[float], ctx: BuildContext) -> float:
        g = ctx.geometry
        t_in, t_out, n = [], [], ctx.num_tokens
        for rate in rates:
            t_in.append(n)
            n = tokens_after(rate, n, ctx.num_protected, self.fuse_token)
            t_out.append(n)
        return vit_macs(t_in, t_out, g.dim, g.attn_dims, g.mlp_hiddens, g.num_patches, g.patch_dim)

    def _at(self, rate: float, locations: list[int], depth: int) -> list[float]:
        return [rate if i in locations else 1.0 for i in range(depth)]

    def resolve_schedule(self, ctx: BuildContext) -> list[int]:
        """The keep rate per block (in :attr:`keep_rates`); returns the tokens removed per block."""
        o = self.opts
        if not ctx.class_token:
            raise UnsupportedModelError(f"evit ranks tokens by the class token's attention; backbone "
                                        f"{ctx.backbone.name!r} has no class token")
        locations = self.locations_opt or default_locations(ctx.depth)
        if locations[-1] >= ctx.depth:
            o.fail("locations", locations, f"increasing block indices in [0, {ctx.depth})",
                   why=f"the backbone {ctx.backbone.name!r} has {ctx.depth} blocks")
        full = self._macs([1.0] * ctx.depth, ctx)
        self.floor_fraction = self._macs(self._at(KEEP_RATE_GRID[0], locations, ctx.depth), ctx) / full
        if self.keep_rates_opt is not None:
            if len(self.keep_rates_opt) != ctx.depth:
                o.fail("keep_rates", self.keep_rates_opt, f"a list of {ctx.depth} keep rates in (0, 1], one per block",
                       why=f"{len(self.keep_rates_opt)} rates for {ctx.depth} blocks")
            rates = [float(r) for r in self.keep_rates_opt]
        elif self.keep_rate_opt is not None:
            rates = self._at(float(self.keep_rate_opt), locations, ctx.depth)
        elif self.budget is None:
            rates = [1.0] * ctx.depth
        else:
            if self.budget < self.floor_fraction - self.budget_tolerance:
                raise BudgetError(
                    f"method 'evit': a budget of {self.budget:.0%} of the MACs is below what pruning at blocks "
                    f"{locations} can reach on {ctx.backbone.name!r} ({self.floor_fraction:.1%}, every location "
                    f"keeping one token); use a larger budget or earlier method.kwargs.locations")
            rate = min(KEEP_RATE_GRID, key=lambda r: (abs(self._macs(self._at(r, locations, ctx.depth), ctx) / full
                                                          - self.budget), -r))
            rates = self._at(rate, locations, ctx.depth)
        self.keep_rates = rates
        self.macs_fraction = self._macs(rates, ctx) / full
        if self.budget is not None and self.keep_rates_opt is None and self.keep_rate_opt is None \
                and abs(self.macs_fraction - self.budget) > self.budget_tolerance:
            warnings.warn(f"evit: the closest keep rate reaches {self.macs_fraction:.1%} of the MACs, "
                          f"{abs(self.macs_fraction - self.budget):.1%} from the budget {self.budget:.0%}", stacklevel=2)
        removed, n = [], ctx.num_tokens
        for rate in rates:
            out = tokens_after(rate, n, ctx.num_protected, self.fuse_token)
            removed.append(n - out)
            n = out
        return removed

    def apply(self, model: nn.Module, ctx: BuildContext) -> None:
        self.schedule = self.resolve_schedule(ctx)
        self.ctx = ctx
        set_token_reducers(model, [EViTReducer(rate, ctx.num_protected, self.fuse_token) if rate < 1 else None
                                   for rate in self.keep_rates])

    # -- checkpoints and records --------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {**super().state(), "keep_rates": list(self.keep_rates), "macs_fraction": self.macs_fraction}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "keep_rates": list(self.keep_rates), "fuse_token": self.fuse_token}
