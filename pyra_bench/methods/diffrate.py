"""DiffRate + LoRA: searched per-layer prune and merge rates (Chen et al., ICCV 2023), PYRA protocol.

What the method does here
-------------------------
* **Block (inference, and LoRA training with a fixed schedule).** In the reducer slot of every block but the
  first (between attention and MLP, like ToMe), per image:
  1. importance = the class token's attention, averaged over heads (with the ``log(size)`` bias of
     proportional attention), computed from the block's ``q``/``k`` for the class query only (one row of
     the attention map, never the full map);
  2. the patch tokens are sorted by importance (class/distillation tokens stay in front);
  3. **prune**: keep the first ``prune_kept`` tokens;
  4. **merge** (if ``merge_kept`` is smaller): each of the remaining least important tokens goes to its most
     similar (cosine of the hidden states ``x``, detached) token among the ``merge_kept`` most important
     ones, never into a class/distillation token; ``x`` becomes the *unweighted* mean of the destination
     and its sources, and the destination's size grows by the sources' sizes times their similarity
     (DiffRate's "similarity-aware" proportional attention: sizes are not conserved).
  Tokens leaving block ``l``: ``min(N_{l-1}, prune_kept_l, merge_kept_l)``, counts *including* the
  class (and distillation) token, as in DiffRate's ``compression_rate.json``. Batched gathers and
  scatters only; the counts are Python ints, so the shapes are static.
* **Search** (stage ``search``; DiffRate's ``ddp.py``): per block two categorical distributions over the
  candidate kept-patch counts ``arange(num_patches, 0, -granularity)`` (zero logits = uniform); the kept
  count is ``STE_ceil(E[c])`` (straight-through ceil, no Gumbel noise); tokens are not removed but
  masked: the sorted tokens get the mask ``hard - p.detach() + p`` with ``p_i = sum_c p_c [i < c]``, which
  multiplies into the token sizes (``size * (eps + (1-eps) mask)``) and so masks them as keys of every
  later attention through the ``log(size)`` bias (DynamicViT's ``softmax_with_policy`` gradient);
  merged sources stay in the tensor, masked. Block 0 is never compressed. Only the rate logits train
  (AdamW, the method config's ``lr``: DiffRate's arch-lr 0.01). Loss: the search objective plus
  ``flops_weight * (MACs/MACs_full - budget)^2``, with DiffRate's differentiable MAC count
  (attention at the block's input count, ``STE_min`` into the MLP).
* After the search the schedule is fixed (``ceil`` of the expected counts, plus the protected tokens) and
  LoRA + head train with the hard path above (stage ``train``); the rate logits are discarded, so "#
  params" is LoRA's alone (the paper's 0.35 % / 0.39 % DiffRate rows).

Where the schedule comes from (``kept_schedule``, recorded as ``method_state.source``)
------------------------------------------------------------------------------------
PYRA searched on ImageNet-21K with the pre-trained in21k head: not possible offline here. Options:
* ``null`` (default): search on the run's data (``search_task``: another task's train split, default the
  run's own), *label-free*: ``search_objective: distill`` matches the compressed model's pre-logits
  features to the uncompressed backbone's (cosine), so the search needs no head and no labels, runs on
  the frozen pre-trained backbone before any LoRA training (as PYRA's search did), and works on any
  images. ``search_objective: ce`` uses the task labels and the current head instead (DiffRate's loss;
  only meaningful with a trained head).
* ``published:<key>``: a schedule from DiffRate's ``compression_rate.json`` (searched on ImageNet-1k;
  only DeiT/MAE backbones at these sizes, none near the "high" 29 % point): see :data:`PUBLISHED`.
* a path to a JSON file ``{"prune_kept": [...], "merge_kept": [...]}`` (e.g. ``method_state`` of an
  earlier run's record, whose schedule you want to reuse), or the dict itself.

Deviations from the official code (OpenGVLab/DiffRate) and why (``../shared/research/baselines.md`` 2.4)
---------------------------------------------------------------------------------------------------------
* The official ``model.train()`` recomputes kept counts from the logits and masks instead of removing
  tokens, so it cannot fine-tune with a loaded schedule; our LoRA training uses the hard inference path.
* The search objective is label-free distillation by default (see above), not ImageNet cross-entropy.
* The MAC penalty is on the MAC *fraction* (so it scales to any backbone); DiffRate's ``5 * (GMACs -
  target)^2`` on ViT-B (17.56 G) is ``1542 * (fraction - f)^2``: the default ``flops_weight``.
* Similarity-scaled sizes use ``max(similarity, 0)`` (the official code can shrink a size, and with
  several dissimilar sources drive it to zero or below, where ``log(size)`` is undefined).
* Search-time sizes are not clamped to 1 (the official training path clamps; ours keeps sizes >= 1 by the
  previous point).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.macs import BudgetError, block_macs, budget_fraction, model_macs
from ..models.merging import TokenReducer
from ..models.schedules import ScheduleError
from ..models.vit import set_token_reducers
from . import options
from .base import METHODS, BuildContext, Method, Stage

#: DiffRate's published schedules (``compression_rate.json``; kept tokens incl. the class token, per block).
PUBLISHED: dict[str, dict[str, list[int]]] = {
    "deit_b_8.7": {
        "prune_kept": [197, 192, 172, 156, 131, 107, 90, 72, 56, 33, 17, 3],
        "merge_kept": [197, 178, 162, 141, 115, 96, 78, 60, 47, 21, 13, 3]},
    "deit_b_11.5": {
        "prune_kept": [197, 197, 197, 188, 170, 154, 139, 123, 107, 72, 43, 3],
        "merge_kept": [197, 197, 192, 178, 158, 145, 127, 111, 94, 50, 35, 3]},
    "mae_b_8.7": {
        "prune_kept": [197, 192, 166, 143, 119, 103, 86, 72, 54, 43, 37, 23],
        "merge_kept": [197, 176, 150, 127, 107, 92, 76, 58, 47, 41, 23, 23]},
    "mae_l_31.0": {
        "prune_kept": [197, 195, 188, 179, 168, 157, 146, 143, 131, 121, 111, 102, 93, 85, 76, 70, 61, 53, 47, 35,
                       31, 26, 21, 14],
        "merge_kept": [197, 191, 184, 172, 161, 151, 145, 135, 125, 117, 106, 96, 89, 80, 72, 64, 54, 50, 40, 27,
                       27, 23, 14, 14]},
}

#: Masked tokens keep ``EPS`` of their size: a log(1e-6) = -13.8 key bias in every later attention.
EPS = 1e-6
STAGES = ("search", "train")


def ste_ceil(x: torch.Tensor) -> torch.Tensor:
    """``ceil`` forward, identity backward (DiffRate's ``STE_Ceil``)."""
    return x + (x.ceil() - x).detach()


def ste_min(n: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``min(n, a, b)`` forward; the gradient goes to ``a`` and ``b`` both, none to ``n`` (``STE_Min``)."""
    m = torch.minimum(torch.minimum(n, a), b)
    return m.detach() + (a + b) - (a + b).detach()


def class_attention(q: torch.Tensor, k: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """The class token's attention over all tokens, averaged over heads: (B, N), float32 (or float64).

    Only the class query's row is computed (B x H x 1 x N), with the same scale and ``log(size)`` bias as
    the block's attention.
    """
    B, H, N, d = k.shape
    dt = torch.promote_types(q.dtype, torch.float32)  # float32 at least (float64 stays float64)
    logits = (q[:, :, :1].to(dt) @ k.to(dt).transpose(-1, -2)) * d ** -0.5
    if size is not None:
        logits = logits + size.to(dt).log().view(B, 1, 1, N)
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def importance_order(importance: torch.Tensor, num_protected: int) -> torch.Tensor:
    """Token indices (B, N): protected tokens first (in order), then the others by descending ``importance``."""
    B = importance.shape[0]
    order = importance[:, num_protected:].argsort(dim=1, descending=True) + num_protected
    if num_protected:
        front = torch.arange(num_protected, device=importance.device).expand(B, num_protected)
        order = torch.cat([front, order], dim=1)
    return order


def sort_by_importance(x: torch.Tensor, size: torch.Tensor, importance: torch.Tensor, num_protected: int):
    """Protected tokens first (in order), then the others by descending ``importance`` (B, N)."""
    B, N, D = x.shape
    order = importance_order(importance, num_protected)
    return x.gather(1, order[..., None].expand(B, N, D)), size.gather(1, order[..., None])


def merge_targets(x: torch.Tensor, kept: int, num_protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For sorted tokens ``x``: each of tokens ``kept:``'s cosine similarity to, and index of, its most similar
    token among ``:kept`` that is not protected (B, N - kept each)."""
    metric = F.normalize(x.detach().float(), dim=-1)
    sim = metric[:, kept:] @ metric[:, :kept].transpose(-1, -2)  # (B, N - kept, kept)
    if num_protected:
        sim[..., :num_protected] = -math.inf
    return sim.max(dim=-1)


def merge_into_kept(x: torch.Tensor, size: torch.Tensor, kept: int, num_protected: int):
    """DiffRate's merge of sorted tokens: tokens ``kept:`` go to their most similar token among ``:kept``
    (never a protected one); unweighted mean including the destination; similarity-scaled sizes."""
    B, N, D = x.shape
    node_max, node_idx = merge_targets(x, kept, num_protected)
    idx = node_idx[..., None]
    dst = x[:, :kept].scatter_reduce(1, idx.expand(B, N - kept, D), x[:, kept:], reduce="mean", include_self=True)
    grow = size[:, kept:] * node_max.clamp(min=0)[..., None].to(size.dtype)
    return dst, size[:, :kept].scatter_add(1, idx, grow)


class DiffRateReducer(TokenReducer):
    """The hard (inference and LoRA-training) DiffRate step of one block, with a fixed schedule."""

    def __init__(self, prune_kept: int, merge_kept: int, num_protected: int):
        super().__init__()
        self.prune_kept, self.merge_kept, self.num_protected = int(prune_kept), int(merge_kept), int(num_protected)

    def tokens_out(self, n: int) -> int:
        return min(n, self.prune_kept, self.merge_kept)

    def forward(self, x, size, q, k):
        B, N, _ = x.shape
        n = min(N, self.prune_kept)
        m = min(n, self.merge_kept)
        if m == N:
            return x, size
        if size is None:
            size = x.new_ones(B, N, 1, dtype=torch.float32)
        importance = class_attention(q, k, size)
        x, size = sort_by_importance(x, size, importance, self.num_protected)
        x, size = x[:, :n], size[:, :n]
        if self.trace is not None:
            self._trace(x, importance, n, m)
        if m < n:
            x, size = merge_into_kept(x, size, m, self.num_protected)
        return x, size

    @torch.no_grad()
    def _trace(self, x_sorted: torch.Tensor, importance: torch.Tensor, n: int, m: int) -> None:
        """Report to ``self.trace``: tokens sorted by importance, those past ``n`` dropped, those in
        ``[m, n)`` merged into their most similar kept token (``x_sorted``: the ``n`` sorted tokens)."""
        B, N = importance.shape
        order = importance_order(importance, self.num_protected)
        ar = torch.arange(N, device=order.device).expand(B, N)
        pos = torch.where(ar < n, ar, -1)
        if m < n:
            pos[:, m:n] = merge_targets(x_sorted, m, self.num_protected)[1]
        self.trace.move(torch.empty_like(order).scatter_(1, order, pos))

    def extra_repr(self) -> str:
        return f"prune_kept={self.prune_kept}, merge_kept={self.merge_kept}"


class RateLogits(nn.Module):
    """A learnable categorical distribution over kept-patch counts (DiffRate's ``prune_ddp``/``merge_ddp``)."""

    def __init__(self, num_patches: int, granularity: int):
        super().__init__()
        self.register_buffer("candidates", torch.arange(num_patches, 0, -granularity, dtype=torch.float32),
                             persistent=False)
        self.logits = nn.Parameter(torch.zeros(len(self.candidates)))

    def probs(self) -> torch.Tensor:
        return self.logits.float().softmax(dim=0)

    def expected(self) -> torch.Tensor:
        return (self.probs() * self.candidates).sum()

    def kept(self) -> torch.Tensor:
        """Kept patch tokens: ``ceil`` of the expectation, straight-through (a 0-d tensor, no host sync)."""
        return ste_ceil(self.expected())

    def token_probability(self, n: int) -> torch.Tensor:
        """``p_i = sum_c p_c [i < c]`` for patch positions ``i < n``."""
        pos = torch.arange(n, device=self.logits.device, dtype=torch.float32)
        return ((pos[:, None] < self.candidates[None, :]).float() * self.probs()[None, :]).sum(dim=1)

    def mask(self, n: int) -> torch.Tensor:
        """Hard ``[i < kept]`` forward, ``token_probability`` gradient."""
        prob = self.token_probability(n)
        pos = torch.arange(n, device=self.logits.device, dtype=torch.float32)
        hard = (pos < self.kept().detach()).float()
        return hard - prob.detach() + prob


class DiffRateSearchReducer(TokenReducer):
    """The differentiable search step of one block: tokens sorted and masked, none removed."""

    def __init__(self, num_patches: int, num_protected: int, granularity: int):
        super().__init__()
        self.num_protected = int(num_protected)
        self.prune = RateLogits(num_patches, granularity)
        self.merge = RateLogits(num_patches, granularity)

    def kept(self) -> tuple[int, int]:
        """The hard schedule the current logits give (tokens incl. protected); host sync: not on the hot path."""
        P = self.num_protected
        return P + int(self.prune.kept().item()), P + int(self.merge.kept().item())

    def tokens_out(self, n: int) -> int:
        return min(n, *self.kept())

    def forward(self, x, size, q, k):
        B, N, D = x.shape
        P = self.num_protected
        if size is None:
            size = x.new_ones(B, N, 1, dtype=torch.float32)
        alive = (size[..., 0] > 0.5).float()  # masked tokens carry EPS-scaled sizes
        x, size = sort_by_importance(x, size, class_attention(q, k, size) + alive, P)
        alive = (size[..., 0] > 0.5)
        n = N - P
        pos = torch.arange(n, device=x.device, dtype=torch.float32)
        kp, km = self.prune.kept().detach(), self.merge.kept().detach()
        # merge (masked): sources = alive tokens in [km, kp), destinations = positions < km
        metric = F.normalize(x.detach().float(), dim=-1)
        sim = metric @ metric.transpose(-1, -2)
        is_dst = torch.cat([pos.new_zeros(P, dtype=torch.bool), pos < km])
        sim = sim.masked_fill(~is_dst[None, None, :], -math.inf)
        node_max, node_idx = sim.max(dim=-1)
        is_src = torch.cat([pos.new_zeros(P, dtype=torch.bool), (pos >= km) & (pos < kp)])[None, :] & alive
        w = is_src[..., None].to(x.dtype)
        idx = node_idx[..., None]
        x = (x + torch.zeros_like(x).scatter_add(1, idx.expand(B, N, D), w * x)) / (
            1 + torch.zeros_like(w).scatter_add(1, idx, w))
        size = size + torch.zeros_like(size).scatter_add(
            1, idx, w.to(size.dtype) * node_max.clamp(min=0)[..., None] * size)
        # mask what this block prunes or merges away (multiplies into the sizes: cumulative)
        mask = torch.cat([pos.new_ones(P), self.prune.mask(n) * self.merge.mask(n)])
        return x, size * (EPS + (1 - EPS) * mask)[None, :, None]


def _load_schedule(spec: Any) -> tuple[dict[str, list[int]], str]:
    if isinstance(spec, str) and spec.startswith("published:"):
        key = spec.split(":", 1)[1]
        if key not in PUBLISHED:
            raise ScheduleError(f"unknown published DiffRate schedule {key!r}; valid: {', '.join(PUBLISHED)}")
        return PUBLISHED[key], spec
    if isinstance(spec, (str, os.PathLike)):
        try:
            with open(spec) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ScheduleError(f"cannot read the DiffRate schedule file {spec}: {e}") from e
        data = data.get("method_state", data)  # a run record works too
        return data, f"file:{spec}"
    if isinstance(spec, dict):
        return spec, "given"
    raise ScheduleError(f"kept_schedule must be null, 'published:<key>' ({', '.join(PUBLISHED)}), a JSON file or "
                        f"a dict with prune_kept/merge_kept; got {spec!r}")


@METHODS.register("diffrate")
class DiffRateMethod(Method):
    name = "diffrate"
    display_name = "DiffRate"
    cost_factor = 1.1  # GPU time of a run relative to PEFT (sweep estimates without records)
    options = options.DiffRate

    def __init__(self, schedule: Any = "low", **kwargs: Any):
        super().__init__(schedule, **kwargs)
        o = self.opts
        if o.kept_schedule is not None and not isinstance(o.kept_schedule, (str, list, tuple, dict)):
            o.wrong_type("kept_schedule", o.kept_schedule, "null, 'published:<name>', a record/JSON file or "
                                                           "{prune_kept: [...], merge_kept: [...]}")
        self.kept_schedule_opt, self.granularity, self.search_epochs = o.kept_schedule, o.granularity, o.search_epochs
        self.search_task, self.search_objective = o.search_task, o.search_objective
        self.flops_weight, self.budget_tolerance = o.flops_weight, o.budget_tolerance
        self.stage = "train"
        self.prune_kept: list[int] | None = None
        self.merge_kept: list[int] | None = None
        self.source = "search"

    # -- building -----------------------------------------------------------------------------------
    def resolve_schedule(self, ctx: BuildContext) -> list[int]:
        spec = self.schedule_spec
        no_budget = spec is None or (isinstance(spec, str) and spec.lower() in ("none", "", "0"))
        if no_budget and self.kept_schedule_opt is None:
            raise ScheduleError("method 'diffrate' searches its schedule to a FLOPs budget: use compression=low|high|"
                                "flops:<fraction>, or give method.kwargs.kept_schedule")
        self.budget = None if no_budget else budget_fraction(spec)
        return [0] * ctx.depth

    def apply(self, model: nn.Module, ctx: BuildContext) -> None:
        self.schedule = self.resolve_schedule(ctx)
        if not ctx.class_token:
            from ..models.vit import UnsupportedModelError

            raise UnsupportedModelError(f"diffrate ranks tokens by class-token attention, and backbone "
                                        f"{ctx.backbone.name!r} has no class token: use a class-token backbone")
        if not all(getattr(blk.attn, "prop_attn", False) for blk in model.blocks):
            raise ConfigError("diffrate needs proportional attention (prop_attn=True): its search masks and "
                             "similarity-scaled sizes enter attention as log(size) key biases")
        self.ctx = ctx
        self.num_patches = ctx.num_tokens - ctx.num_protected
        self.full_macs = model_macs(model)
        self._geometry = [(blk.attn.qkv.out_features // 3, blk.mlp.fc1.out_features) for blk in model.blocks]
        pe = model.patch_embed
        self._patch_macs = pe.num_patches * pe.proj.in_channels * pe.proj.kernel_size[0] * pe.proj.kernel_size[1] * ctx.dim
        self._adapt = [n for n, p in model.named_parameters() if p.requires_grad]  # LoRA + head
        if self.kept_schedule_opt is not None:
            sched, self.source = _load_schedule(self.kept_schedule_opt)
            self._set_kept(sched.get("prune_kept"), sched.get("merge_kept"))
            self._install_hard(model)
            self._check_budget()
        else:
            self._check_reachable()
            self._install_search(model)
            self.stage = "search"

    def _set_kept(self, prune, merge) -> None:
        L, N, P = self.ctx.depth, self.ctx.num_tokens, self.ctx.num_protected
        for name, lst in (("prune_kept", prune), ("merge_kept", merge)):
            if not isinstance(lst, (list, tuple)) or len(lst) != L:
                raise ScheduleError(f"DiffRate schedule: {name} must list one kept-token count per block ({L} blocks), "
                                    f"got {lst!r}")
            for i, v in enumerate(lst):
                if not P + 1 <= int(v) <= N:
                    raise ScheduleError(f"DiffRate schedule: {name}[{i}] = {v} is outside [{P + 1}, {N}] (block {i} "
                                        f"has at most {N} tokens, {P} of them protected; counts include them)")
        self.prune_kept, self.merge_kept = [int(v) for v in prune], [int(v) for v in merge]

    def tokens_after_blocks(self) -> list[int]:
        n, out = self.ctx.num_tokens, []
        for p, m in zip(self.prune_kept, self.merge_kept):
            n = min(n, p, m)
            out.append(n)
        return out

    def macs_fraction(self) -> float:
        if self.prune_kept is None:
            return float("nan")
        n_in = [self.ctx.num_tokens, *self.tokens_after_blocks()[:-1]]
        macs = self._patch_macs + sum(block_macs(a, b, self.ctx.dim, ad, h) for a, b, (ad, h)
                                      in zip(n_in, self.tokens_after_blocks(), self._geometry))
        return macs / self.full_macs

    def floor_fraction(self) -> float:
        """The least MACs the search can reach: block 0 whole, every later block keeping the smallest
        candidate count (``num_patches mod granularity``, or ``granularity``) plus the protected tokens."""
        smallest = (self.num_patches - 1) % self.granularity + 1
        keep = [self.ctx.num_tokens] + [self.ctx.num_protected + smallest] * (self.ctx.depth - 1)
        n_in, n, out = [], self.ctx.num_tokens, []
        for k in keep:
            n_in.append(n)
            n = min(n, k)
            out.append(n)
        macs = self._patch_macs + sum(block_macs(a, b, self.ctx.dim, ad, h) for a, b, (ad, h)
                                      in zip(n_in, out, self._geometry))
        return macs / self.full_macs

    def _check_reachable(self) -> None:
        """Refuse, before any training, a budget the search cannot reach (as SPViT does)."""
        if self.budget is None:
            return
        floor = self.floor_fraction()
        if self.budget < floor - self.budget_tolerance:
            raise BudgetError(
                f"diffrate: a budget of {self.budget:.3f} of the backbone's MACs is below what its search can reach "
                f"on backbone {self.ctx.backbone.name!r}: {floor:.3f} (block 0 is never compressed and every later "
                f"block keeps at least {self.ctx.num_protected + (self.num_patches - 1) % self.granularity + 1} "
                f"tokens with granularity {self.granularity}). Ask for flops:{floor:.2f} or more.")

    def budget_miss(self) -> bool | None:
        """Whether the fixed schedule is further than ``budget_tolerance`` from the budget (None: no schedule
        or no budget yet); recorded in :meth:`state` so records and tables can flag the run."""
        if self.budget is None or self.prune_kept is None:
            return None
        return abs(self.macs_fraction() - self.budget) > self.budget_tolerance

    def _check_budget(self) -> None:
        f = self.macs_fraction()
        if self.budget_miss():
            warnings.warn(f"diffrate: the schedule ({self.source}) gives {f:.3f} of the backbone's MACs, "
                          f"{abs(f - self.budget):.3f} away from the budget {self.budget:.3f}", stacklevel=3)

    def _install_hard(self, model: nn.Module) -> None:
        P = self.ctx.num_protected
        set_token_reducers(model, [DiffRateReducer(p, m, P) if min(p, m) < self.ctx.num_tokens else None
                                   for p, m in zip(self.prune_kept, self.merge_kept)])

    def _install_search(self, model: nn.Module) -> None:
        if self.search_reducers(model):
            return
        ref = next(model.parameters())
        set_token_reducers(model, [None] + [
            DiffRateSearchReducer(self.num_patches, self.ctx.num_protected, self.granularity).to(ref.device)
            for _ in range(self.ctx.depth - 1)])

    def search_reducers(self, model: nn.Module) -> list[DiffRateSearchReducer]:
        return [b.token_reducer for b in model.blocks if isinstance(b.token_reducer, DiffRateSearchReducer)]

    # -- stages ------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        if self.kept_schedule_opt is not None:
            return [Stage("train")]
        return [Stage("search", self.search_epochs, evaluate=False, task=self.search_task), Stage("train")]

    def on_stage_start(self, stage: Stage, model: nn.Module, data: Any = None) -> None:
        if stage.name not in STAGES:
            raise ConfigError(f"unknown diffrate stage {stage.name!r}; valid: {', '.join(STAGES)}")
        adapt = set(self._adapt)
        if stage.name == "search":
            self._install_search(model)
            for n, p in model.named_parameters():
                p.requires_grad_(".token_reducer." in n)
        else:
            reducers = self.search_reducers(model)
            if reducers:  # fix the searched schedule, drop the logits
                kept = [(self.ctx.num_tokens, self.ctx.num_tokens)] + [r.kept() for r in reducers]
                self._set_kept([p for p, _ in kept], [m for _, m in kept])
                self._install_hard(model)
                self._check_budget()
            for n, p in model.named_parameters():
                p.requires_grad_(n in adapt)
        self.stage = stage.name

    def search_macs(self, model: nn.Module) -> torch.Tensor:
        """DiffRate's differentiable MAC count at the current logits (``calculate_flop_training``)."""
        P = self.ctx.num_protected
        n = torch.tensor(float(self.ctx.num_tokens), device=next(model.parameters()).device)
        total = n.new_tensor(float(self._patch_macs))
        for blk, (ad, h) in zip(model.blocks, self._geometry):
            red = blk.token_reducer
            n_out = n if not isinstance(red, DiffRateSearchReducer) else ste_min(n, P + red.prune.kept(),
                                                                                  P + red.merge.kept())
            total = total + block_macs(n, n_out, self.ctx.dim, ad, h)
            n = n_out
        return total

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.stage != "search" or self.budget is None:
            return None
        return self.flops_weight * (self.search_macs(model) / self.full_macs - self.budget) ** 2

    def training_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        if self.stage != "search" or self.search_objective == "ce":
            return super().training_loss(model, x, y)
        reducers = [b.token_reducer for b in model.blocks]
        was_training = model.training
        with torch.no_grad():  # the uncompressed backbone's features: the label-free target
            set_token_reducers(model, [None] * len(reducers))
            model.eval()
            target = model.forward_head(model.forward_features(x), pre_logits=True)
        set_token_reducers(model, reducers)
        model.train(was_training)
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        return (1 - F.cosine_similarity(feats.float(), target.float(), dim=-1)).mean(), None

    # -- checkpoints --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        s: dict[str, Any] = {"schedule": list(self.schedule), "stage": self.stage, "source": self.source,
                             "budget": self.budget, "granularity": self.granularity,
                             "search_objective": self.search_objective, "search_task": self.search_task,
                             "prune_kept": self.prune_kept, "merge_kept": self.merge_kept}
        if self.prune_kept is not None:
            s["tokens_after_blocks"] = self.tokens_after_blocks()
            s["macs_fraction"] = self.macs_fraction()
            s["budget_tolerance"] = self.budget_tolerance
            s["budget_miss"] = self.budget_miss()
        return s

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        self.source = state.get("source", self.source)
        if state.get("stage") == "train" and state.get("prune_kept") is not None:
            self._set_kept(state["prune_kept"], state["merge_kept"])
            self._install_hard(model)
            self.stage = "train"
        else:
            self._install_search(model)
            self.stage = "search"

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "source": self.source, "prune_kept": self.prune_kept,
                "merge_kept": self.merge_kept, "budget": self.budget}
