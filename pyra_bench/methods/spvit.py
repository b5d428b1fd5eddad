"""SPViT + LoRA: learned soft token pruning with package tokens (Kong et al., ECCV 2022), PYRA protocol.

What the method does here
-------------------------
* **Selectors.** A small MLP (DynamicViT's ``PredictorLG``, on which SPViT builds) sits in the token-reducer
  slot of a few blocks (between attention and MLP, see :mod:`pyra_bench.models.vit`). It scores the spatial
  tokens still alive from their features and a policy-weighted global mean, as keep/drop log-probabilities.
  Default locations: blocks ``L/4*k - 1`` (k = 1, 2, 3), i.e. 2/5/8 for 12 blocks and 5/11/17 for 24
  (``selector_blocks`` overrides; tiny backbones get their first three blocks).
* **Package token.** The tokens dropped at a selector are folded into one *package token* appended after
  the kept ones: the mean of the dropped tokens weighted by their keep probabilities (a softmax of the
  selector's keep log-probability over the dropped set), whose *size* is the number of tokens it stands
  for, so proportional attention weighs it like that many tokens. Class/distillation tokens and earlier
  package tokens are never scored or dropped. Output layout: ``[prefix, kept, package_1, ..., package_s]``.
* **Training (stage ``prune``).** DynamicViT/SPViT soft pruning: nothing is removed; hard Gumbel-softmax
  decisions (straight-through), multiplied by the previous decisions (dropped stays dropped), mask the
  dropped tokens out of every later attention as *keys*. The mask travels in the token sizes (``size =
  eps + (1-eps)*decision``, so ``log(size)`` is a -13.8 key bias; its gradient equals that of DynamicViT's
  multiplicative ``softmax_with_policy``), which needs proportional attention on (it is by default).
* **Inference (and stage ``retrain``).** Deterministic, batched top-k: each selector keeps exactly
  ``keep[s]`` spatial tokens per image (largest keep log-probability; ties broken by ``torch.topk``),
  gathers them in their original order, and appends the package token. No Gumbel noise, no Python loop,
  no batch-size restriction; the kept count is fixed, so the MACs are known exactly (``tokens_out``).
* **Budget.** ``schedule`` is a FLOPs budget (``low`` = 50 %, ``high`` = 29 % of the backbone's MACs,
  ``flops:<f>``). The per-selector keep counts are geometric (``keep_s = round(r^(s+1) * patches)``, as
  DynamicViT's ``base_rate**k``) with ``r`` solved so the analytic MACs of the pruned inference model
  (:func:`pyra_bench.models.macs.vit_macs`, package tokens included, *plus the selectors' own matmuls*,
  ``SPViTSelector.extra_macs``: ~2 % of ViT-B's MACs at width D) match the budget; an explicit
  ``keep_ratios`` list overrides. A budget below the reachable floor (every selector keeping one token) is
  refused at build time, with the floor in the message.
* **Loss ("latency-aware").** During ``prune``:
  ``ratio_weight * mean_s mean_b (kept_s/patches - rho_s)^2`` (SPViT/DynamicViT keep-ratio loss) plus
  ``flops_weight * mean_b (MACs_b/MACs_full - f)^2`` where ``MACs_b`` is the analytic MAC model evaluated
  (differentiably) at the image's soft token counts and ``f`` the MAC fraction the inference model has.

Stages (PYRA Sec. 4.2: "first train the backbone with LoRA ..., then we prune the models, and lastly we
re-train the parameters attached by the pruning method and LoRA"):
``lora`` (LoRA + head, no selectors) -> ``prune`` (selectors inserted; selectors + LoRA + head trained with
Gumbel decisions and the budget loss) -> ``retrain`` (selectors + LoRA + head trained through the exact
inference path: hard top-k with the fixed keep counts; the selectors learn through the package weights).

Deviations from the official code (PeiyanFlying/SPViT) and why
---------------------------------------------------------------
* Official inference is Gumbel-sampled in eval, batch-1 only, and drops its own package token
  (``../shared/research/baselines.md`` section 3.3); we use DynamicViT's batched deterministic top-k.
* Official package token: weighted *sum* in training, unweighted mean over the whole batch at inference;
  ours is the same keep-probability-weighted *mean* in training and inference, with a size.
* Selector: SPViT's ``MultiheadPredictorLG`` (64-wide chunks sharing one module, SE head weighting, 7.1 k
  parameters) is replaced by DynamicViT's D-wide ``PredictorLG`` (width ``selector_hidden * D``), because
  the paper's "# params" (SPViT 4.46 % ViT-B, 2.47 % ViT-L = LoRA + ~6.0 D^2) needs D^2-sized selectors.
  Three ``PredictorLG(D)`` are 4.9 D^2 (3.71 % ViT-B, 2.08 % ViT-L); ``selector_hidden: 1.1585`` (888 /
  1188 wide) gives ~6.0 D^2 and reproduces both of the paper's percentages, 4.46 % / 2.47 % (PYRA's exact
  module is unpublished, so the default stays DynamicViT's).
* Placement: the official ``pruning_loc = [3, 6, 9]`` prunes *before* blocks 3/6/9. Our reducer slot is
  after a block's attention, so blocks 2/5/8 prune one MLP earlier than that (blocks 3/6/9 would leave one
  more full attention unpruned). Floors (every selector keeping one token, D-wide selectors included):
  ViT-B 22.9 % at 2/5/8 but 31.0 % at 3/6/9, so ``high`` (29 %) is reachable with the default (keeps
  41/8/2 of 196) and refused with 3/6/9 (the official placement, before blocks 3/6/9, bottoms out at 27 %
  without selector cost); ViT-L 24.6 % at 5/11/17, 28.7 % at 6/12/18 (``high`` there keeps 4/1/1).
* No knowledge distillation (official: KL to a DeiT teacher + token MSE): PYRA's protocol mentions none, and
  the framework's ``extra_loss`` sees only the model.
* Keep ratios: official DeiT ratios are hand-set ([0.617, 0.369, 0.137], "latency-aware" through a device
  latency table that is not released); ours are solved from the MAC budget, and the MAC model replaces the
  latency model in the loss.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.macs import BUDGETS, block_macs, budget_fraction, model_macs, vit_macs
from ..models.merging import TokenReducer
from ..models.vit import set_token_reducers
from . import options
from .base import METHODS, BuildContext, Method, Stage

#: The masked-token size in soft (training) mode: log(EPS) = -13.8 as a key bias.
EPS = 1e-6
STAGES = ("lora", "prune", "retrain")


class BudgetError(ConfigError):
    """A FLOPs budget the method cannot reach with its configuration, or a compression that is no budget."""


def is_no_budget(spec: Any) -> bool:
    """``compression=none`` in any of its spellings (None, ``"none"``, ``""``, ``"0"``, ``0``)."""
    if isinstance(spec, bool):
        return False
    if isinstance(spec, str):
        return spec.strip().lower() in ("none", "", "0")
    return spec is None or spec == 0


def parse_budget(spec: Any, method: str) -> float | None:
    """The MACs fraction a budget method's ``compression`` asks for (None for ``none``).

    Anything that is not a budget (``"r16"``, ``"flops:1.5"``, ``True``, ...) is a :class:`BudgetError`
    naming the value and the accepted forms.
    """
    if is_no_budget(spec):
        return None
    try:
        return budget_fraction(spec)
    except ValueError as e:
        forms = ", ".join(f"{k} ({100 * v:g} % of the backbone's MACs)" for k, v in BUDGETS.items())
        raise BudgetError(
            f"method {method!r}: compression={spec!r} is not a FLOPs budget ({e}). Use compression= one of "
            f"{forms}, or flops:<fraction> with the fraction in (0, 1], e.g. compression=flops:0.4") from None


class TokenSelector(nn.Module):
    """DynamicViT's ``PredictorLG`` with a configurable width ``hidden``: keep/drop log-probabilities.

    ``LN -> Linear(D, h) -> GELU``; the first half of the channels stays local, the second half is replaced
    by its policy-weighted mean over the image's live tokens; ``Linear(h, h/2) -> GELU -> Linear(h/2, h/4)
    -> GELU -> Linear(h/4, 2) -> LogSoftmax``. Index 0 = keep.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        if hidden < 4:
            raise ValueError(f"selector width must be >= 4, got {hidden}")
        self.hidden = hidden
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(hidden, hidden // 2), nn.GELU(),
            nn.Linear(hidden // 2, hidden // 4), nn.GELU(),
            nn.Linear(hidden // 4, 2), nn.LogSoftmax(dim=-1),
        )

    @staticmethod
    def num_params(dim: int, hidden: int) -> int:
        h2, h4 = hidden // 2, hidden // 4
        return 2 * dim + (dim + 1) * hidden + (hidden + 1) * h2 + (h2 + 1) * h4 + (h4 + 1) * 2

    @staticmethod
    def macs(n_tokens, dim: int, hidden: int):
        """Matmul MACs of scoring ``n_tokens`` tokens and folding them into a package token (weighted sum)."""
        h2, h4 = hidden // 2, hidden // 4
        return n_tokens * (dim * hidden + hidden * h2 + h2 * h4 + h4 * 2 + dim)

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None) -> torch.Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, glob = x[..., :half], x[..., half:]
        if policy is None:
            g = glob.mean(dim=1, keepdim=True)
        else:
            p = policy.to(glob.dtype)
            g = (glob * p).sum(dim=1, keepdim=True) / p.sum(dim=1, keepdim=True).clamp_min(EPS)
        return self.out_conv(torch.cat([local, g.expand_as(glob)], dim=-1))


class SPViTSelector(TokenReducer):
    """The token reducer of one selector block (index ``index`` among the selectors).

    ``train_mode``: ``"gumbel"`` (soft masks, stage ``prune``) or ``"topk"`` (the inference path, also
    used for training in stage ``retrain``). In eval mode it is always top-k.
    """

    def __init__(self, dim: int, hidden: int, index: int, keep: int, num_prefix: int, tau: float = 1.0):
        super().__init__()
        self.selector = TokenSelector(dim, hidden)
        self.index, self.keep, self.num_prefix, self.tau = int(index), int(keep), int(num_prefix), float(tau)
        self.train_mode = "gumbel"
        self.last_kept: torch.Tensor | None = None  # (B,) soft kept counts of the last gumbel forward

    def tokens_out(self, n: int) -> int:
        n_sp = n - self.num_prefix - self.index
        return self.num_prefix + min(self.keep, n_sp) + self.index + 1

    def extra_macs(self, n: int) -> int:
        """MACs the selector itself adds for ``n`` input tokens (not in the backbone's matmul count)."""
        return TokenSelector.macs(n - self.num_prefix - self.index, self.selector.in_conv[1].in_features,
                                  self.selector.hidden)

    def _split(self, t: torch.Tensor):
        p, s = self.num_prefix, self.index
        n_sp = t.shape[1] - p - s
        return t[:, :p], t[:, p:p + n_sp], t[:, p + n_sp:]

    def forward(self, x, size, q=None, k=None):
        B, N, _ = x.shape
        if N - self.num_prefix - self.index < 1:
            raise RuntimeError(f"selector {self.index} got {N} tokens: no spatial token left to score")
        if size is None:
            size = torch.ones(B, N, 1, device=x.device, dtype=torch.float32)
        if self.training and self.train_mode == "gumbel":
            return self._soft(x, size)
        self.last_kept = None
        return self._hard(x, size)

    # -- training: Gumbel decisions, tokens masked (not removed) ------------------------------------------
    def _soft(self, x, size):
        x_pre, x_sp, x_pk = self._split(x)
        s_pre, s_sp, s_pk = self._split(size)
        prev = (s_sp - EPS) / (1.0 - EPS)  # previous decisions (1 kept, 0 dropped; straight-through grads)
        logp = self.selector(x_sp, prev)
        hard = F.gumbel_softmax(logp.float(), tau=self.tau, hard=True)[..., :1]
        policy = hard * prev
        newly = prev - policy  # dropped at this selector
        lp = logp[..., :1].float()
        dropped = newly.detach() > 0.5
        m = lp.masked_fill(~dropped, -math.inf).amax(dim=1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
        w = newly * torch.exp(lp - m).masked_fill(~dropped, 0.0)
        pkg = (w.to(x.dtype) * x_sp).sum(dim=1, keepdim=True) / (w.sum(dim=1, keepdim=True).to(x.dtype) + 1e-12)
        count = newly.sum(dim=1, keepdim=True)
        self.last_kept = policy.sum(dim=(1, 2))
        x_out = torch.cat([x_pre, x_sp, x_pk, pkg], dim=1)
        size_out = torch.cat([s_pre, EPS + (1.0 - EPS) * policy, s_pk, EPS + count], dim=1)
        return x_out, size_out

    # -- inference (and retraining): deterministic batched top-k, tokens removed --------------------------
    def _hard(self, x, size):
        B, _, D = x.shape
        x_pre, x_sp, x_pk = self._split(x)
        s_pre, s_sp, s_pk = self._split(size)
        n_sp = x_sp.shape[1]
        k = min(self.keep, n_sp)
        lp = self.selector(x_sp, None)[..., 0].float()  # (B, n_sp) keep log-probabilities
        idx = lp.topk(k, dim=1, sorted=False).indices.sort(dim=1).values  # (B, k), original order
        keep_mask = torch.zeros(B, n_sp, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
        kept_x = x_sp.gather(1, idx[..., None].expand(B, k, D))
        kept_s = s_sp.gather(1, idx[..., None])
        if k < n_sp:
            w = torch.softmax(lp.masked_fill(keep_mask, -math.inf), dim=1)[..., None]  # 0 on kept tokens
            pkg = (w.to(x.dtype) * x_sp).sum(dim=1, keepdim=True)
            count = (s_sp * (~keep_mask)[..., None]).sum(dim=1, keepdim=True)
        else:  # nothing to fold: an empty package (size EPS, i.e. masked as a key)
            pkg = x_sp.new_zeros(B, 1, D)
            count = s_sp.new_zeros(B, 1, 1)
        x_out = torch.cat([x_pre, kept_x, x_pk, pkg], dim=1)
        size_out = torch.cat([s_pre, kept_s, s_pk, count.clamp_min(EPS)], dim=1)
        if self.trace is not None:
            self._trace(idx, x_pre.shape[1], n_sp, x_pk.shape[1])
        return x_out, size_out

    @torch.no_grad()
    def _trace(self, idx: torch.Tensor, p: int, n_sp: int, n_pk: int) -> None:
        """Report the top-k selection to ``self.trace``: kept tokens in order, the others fused into the new
        package token (after the earlier packages), prefix and earlier packages unchanged."""
        B, k = idx.shape
        package = p + k + n_pk
        ar = torch.arange(p + n_sp + n_pk, device=idx.device).expand(B, -1)
        spatial = torch.full((B, n_sp), package, dtype=torch.long, device=idx.device).scatter(1, idx, ar[:, p:p + k])
        new_of_old = torch.cat([ar[:, :p], spatial, package - n_pk + ar[:, :n_pk]], dim=1)
        self.trace.move(new_of_old, fused_token=package if k < n_sp else None)

    def extra_repr(self) -> str:
        return f"index={self.index}, keep={self.keep}, prefix={self.num_prefix}, train_mode={self.train_mode}"


def default_selector_blocks(depth: int) -> list[int]:
    blocks = sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3)})
    if len(blocks) < min(3, depth):
        blocks = list(range(min(3, depth)))
    return blocks


@METHODS.register("spvit")
class SPViTMethod(Method):
    """SPViT + LoRA (see the module docstring). ``schedule``: ``low`` / ``high`` / ``flops:<f>``."""

    name = "spvit"
    display_name = "SPViT"
    cost_factor = 2.0  # GPU time of a run relative to PEFT (sweep estimates without records)
    param_group = "spvit"
    options = options.SPViT

    def __init__(self, schedule: Any = "low", **kwargs: Any):
        super().__init__(schedule, **kwargs)
        o = self.opts
        self.selector_blocks_opt = o.selector_blocks
        if self.selector_blocks_opt is not None and sorted(set(self.selector_blocks_opt)) != self.selector_blocks_opt:
            o.fail("selector_blocks", self.selector_blocks_opt, "a list of increasing block indices, e.g. [2, 5, 8]")
        self.selector_hidden_opt, self.keep_ratios_opt = o.selector_hidden, o.keep_ratios
        self.ratio_weight, self.flops_weight, self.tau = o.ratio_weight, o.flops_weight, o.tau
        self.budget_tolerance = o.budget_tolerance
        self.epochs = {s: getattr(o, f"{s}_epochs") for s in ("lora", "prune", "retrain")}
        if parse_budget(schedule, self.name) is None and self.keep_ratios_opt is None:  # the form, before any work
            raise BudgetError(f"method 'spvit' prunes tokens to a FLOPs budget: use compression=low|high|"
                              f"flops:<fraction> (or give method.kwargs.keep_ratios), got compression={schedule!r}")
        self.stage = "init"
        # filled by apply()
        self.budget: float | None = None
        self.selector_blocks: list[int] = []
        self.keep: list[int] = []
        self.hidden = 0
        self.macs_fraction = 1.0
        self.floor_fraction = 0.0

    # -- building -----------------------------------------------------------------------------------
    def resolve_schedule(self, ctx: BuildContext) -> list[int]:
        parse_budget(self.schedule_spec, self.name)  # the form (checked at construction too)
        o = self.opts
        blocks = self.selector_blocks_opt or default_selector_blocks(ctx.depth)
        if blocks[-1] >= ctx.depth:
            o.fail("selector_blocks", blocks, f"increasing block indices in [0, {ctx.depth})",
                   why=f"the backbone {ctx.backbone.name!r} has {ctx.depth} blocks")
        if self.keep_ratios_opt is not None and len(self.keep_ratios_opt) != len(blocks):
            o.fail("keep_ratios", self.keep_ratios_opt, f"a list of {len(blocks)} kept fractions, one per selector "
                   f"block {blocks}", why=f"{len(self.keep_ratios_opt)} ratios for {len(blocks)} selectors")
        return [0] * ctx.depth

    def apply(self, model: nn.Module, ctx: BuildContext) -> None:
        self.schedule = self.resolve_schedule(ctx)
        if not all(getattr(blk.attn, "prop_attn", False) for blk in model.blocks):
            raise ConfigError("spvit needs proportional attention (prop_attn=True): its training-time token "
                              "masks and package-token sizes enter attention as log(size) key biases; build "
                              "the model with prop_attn=True (the default)")
        self.selector_blocks = self.selector_blocks_opt or default_selector_blocks(ctx.depth)
        self.num_prefix = ctx.num_protected
        self.num_patches = ctx.num_tokens - ctx.num_protected
        self.dim = ctx.dim
        self.hidden = max(4, int(round(self.selector_hidden_opt * ctx.dim / 4)) * 4)
        self._geometry = _Geometry.from_model(model, self.num_prefix)
        self.full_macs = model_macs(model)
        self.floor_fraction = self._fraction([1] * len(self.selector_blocks))
        self.budget = parse_budget(self.schedule_spec, self.name)
        if self.keep_ratios_opt is not None:
            self.keep = self._monotone([round(r * self.num_patches) for r in self.keep_ratios_opt])
        else:
            self.keep = self._solve_keep(self.budget)
        self.macs_fraction = self._fraction(self.keep)
        if self.keep_ratios_opt is None and all(k == 1 for k in self.keep):
            warnings.warn(f"spvit: the budget {self.budget:.3f} sits at the reachable floor "
                          f"{self.floor_fraction:.3f}: every selector keeps a single token", stacklevel=2)
        if self.budget is not None and self.keep_ratios_opt is not None:
            warnings.warn(f"spvit: explicit keep_ratios override the budget {self.budget:.3f}: the inference model "
                          f"has {self.macs_fraction:.3f} of the backbone's MACs", stacklevel=2)
        elif self.budget is not None and abs(self.macs_fraction - self.budget) > self.budget_tolerance:
            warnings.warn(f"spvit: keep counts {self.keep} give {self.macs_fraction:.3f} of the backbone's MACs, "
                          f"{abs(self.macs_fraction - self.budget):.3f} away from the budget {self.budget:.3f} "
                          "(token granularity)", stacklevel=2)

    def _monotone(self, counts: list[int]) -> list[int]:
        out, prev = [], self.num_patches
        for c in counts:
            c = min(max(int(c), 1), prev)
            out.append(c)
            prev = c
        return out

    def _fraction(self, keep: list[int], selectors: bool = True) -> float:
        """MACs of the pruned inference model (selectors included unless ``selectors=False``) / backbone's."""
        return self._geometry.macs(self.selector_blocks, keep, self.hidden if selectors else 0) / self.full_macs

    def selector_macs(self) -> int:
        return round((self._fraction(self.keep) - self._fraction(self.keep, selectors=False)) * self.full_macs)

    def _solve_keep(self, f: float) -> list[int]:
        S, Np = len(self.selector_blocks), self.num_patches

        def counts(r: float) -> list[int]:
            return self._monotone([round(r ** (s + 1) * Np) for s in range(S)])

        if f < self.floor_fraction - self.budget_tolerance:
            raise BudgetError(
                f"spvit: a budget of {f:.3f} of the backbone's MACs is below the reachable floor "
                f"{self.floor_fraction:.3f} with selectors in blocks {self.selector_blocks} (every selector "
                "keeping one token; the blocks before the first selector are never pruned). Move the selectors "
                "earlier (selector_blocks=[...]) or ask for a larger budget.")
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if self._fraction(counts(mid)) <= f:
                lo = mid
            else:
                hi = mid
        best = min((counts(lo), counts(hi)), key=lambda c: abs(self._fraction(c) - f))
        return best

    # -- stages -------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage("lora", self.epochs["lora"], evaluate=False),
                Stage("prune", self.epochs["prune"], evaluate=False),
                Stage("retrain", self.epochs["retrain"], evaluate=True)]

    def selectors(self, model: nn.Module) -> list[SPViTSelector]:
        return [blk.token_reducer for blk in model.blocks if isinstance(blk.token_reducer, SPViTSelector)]

    def _install(self, model: nn.Module) -> None:
        if self.selectors(model):
            return
        ref = next(p for p in model.parameters())
        reducers: list[TokenReducer | None] = [None] * len(model.blocks)
        for s, b in enumerate(self.selector_blocks):
            reducers[b] = SPViTSelector(self.dim, self.hidden, s, self.keep[s], self.num_prefix, self.tau).to(
                device=ref.device, dtype=ref.dtype)
        set_token_reducers(model, reducers)

    def _set_stage(self, model: nn.Module, stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown spvit stage {stage!r}; valid: {', '.join(STAGES)}")
        self.stage = stage
        if stage == "lora":
            set_token_reducers(model, [None] * len(model.blocks))
            return
        self._install(model)
        for sel in self.selectors(model):
            sel.train_mode = "gumbel" if stage == "prune" else "topk"
            sel.requires_grad_(True)

    def on_stage_start(self, stage: Stage, model: nn.Module, data: Any = None) -> None:
        self._set_stage(model, stage.name)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.stage != "prune":
            return None
        sels = self.selectors(model)
        if not sels or any(s.last_kept is None for s in sels):
            return None
        Np = self.num_patches
        ratio_loss = sum(((s.last_kept / Np - s.keep / Np) ** 2).mean() for s in sels) / len(sels)
        counts = {s.index: s.last_kept for s in sels}
        macs = self._geometry.macs(self.selector_blocks, [counts[i] for i in range(len(sels))], self.hidden)
        flops_loss = ((macs / self.full_macs - self.macs_fraction) ** 2).mean()
        for s in sels:
            s.last_kept = None
        return self.ratio_weight * ratio_loss + self.flops_weight * flops_loss

    # -- checkpoints --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"schedule": list(self.schedule), "stage": self.stage, "selector_blocks": list(self.selector_blocks),
                "keep": list(self.keep), "selector_hidden": self.hidden, "budget": self.budget,
                "macs_fraction": self.macs_fraction, "floor_fraction": self.floor_fraction,
                "backbone_macs_fraction": self._fraction(self.keep, selectors=False)}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        blocks, keep = [int(b) for b in state["selector_blocks"]], [int(k) for k in state["keep"]]
        hidden = int(state["selector_hidden"])
        if self.selectors(model) and (blocks != self.selector_blocks or keep != self.keep or hidden != self.hidden):
            set_token_reducers(model, [None] * len(model.blocks))  # a different structure: rebuild
        self.selector_blocks, self.keep, self.hidden = blocks, keep, hidden
        self.macs_fraction = float(state.get("macs_fraction", self._fraction(keep)))
        self._set_stage(model, state.get("stage", "lora") if state.get("stage") in STAGES else "lora")

    # -- accounting ---------------------------------------------------------------------------------
    def paper_param_count(self, model: nn.Module) -> int:
        """The selectors (every parameter they have): "the parameters attached by the pruning method"."""
        return sum(p.numel() for s in self.selectors(model) for p in s.parameters())

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "selector_blocks": self.selector_blocks, "keep": self.keep,
                "selector_hidden": self.hidden, "budget": self.budget, "macs_fraction": self.macs_fraction}


class _Geometry:
    """Per-block widths of a backbone, for MACs at given selector keep counts (ints or (B,) tensors)."""

    def __init__(self, dim, attn_dims, hiddens, num_patches, patch_dim, num_prefix):
        self.dim, self.attn_dims, self.hiddens = dim, attn_dims, hiddens
        self.num_patches, self.patch_dim, self.num_prefix = num_patches, patch_dim, num_prefix

    @classmethod
    def from_model(cls, model: nn.Module, num_prefix: int) -> _Geometry:
        pe = model.patch_embed
        patch_dim = pe.proj.in_channels * pe.proj.kernel_size[0] * pe.proj.kernel_size[1]
        return cls(model.embed_dim, [b.attn.qkv.out_features // 3 for b in model.blocks],
                   [b.mlp.fc1.out_features for b in model.blocks], pe.num_patches, patch_dim, num_prefix)

    def macs(self, selector_blocks: list[int], keep: list, selector_hidden: int = 0):
        """Backbone matmul MACs (as :func:`~pyra_bench.models.macs.model_macs` counts them) plus, for
        ``selector_hidden > 0``, the selectors' own MACs. ``keep`` may hold (B,) tensors (differentiable)."""
        n = self.num_prefix + self.num_patches
        where = dict(zip(selector_blocks, range(len(selector_blocks))))
        extra = 0
        if all(isinstance(k, int) for k in keep):
            t_in, t_out = [], []
            for i in range(len(self.attn_dims)):
                t_in.append(n)
                if i in where:
                    s = where[i]
                    if selector_hidden:
                        extra += TokenSelector.macs(n - self.num_prefix - s, self.dim, selector_hidden)
                    n = self.num_prefix + keep[s] + s + 1
                t_out.append(n)
            return extra + vit_macs(t_in, t_out, self.dim, self.attn_dims, self.hiddens, self.num_patches,
                                    self.patch_dim)
        total = self.num_patches * self.patch_dim * self.dim
        for i, (a, h) in enumerate(zip(self.attn_dims, self.hiddens)):
            n_in = n
            if i in where:
                s = where[i]
                if selector_hidden:
                    total = total + TokenSelector.macs(n_in - self.num_prefix - s, self.dim, selector_hidden)
                n = self.num_prefix + keep[s] + s + 1
            total = total + block_macs(n_in, n, self.dim, a, h)
        return total
