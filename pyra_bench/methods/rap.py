"""RaP + LoRA: random channel pruning of a LoRA-adapted ViT (Li et al., CVPR 2022), PYRA protocol.

**Our design.** RaP ("Revisiting Random Channel Pruning for Neural Network Compression") released no code
and studies CNNs only; PYRA's ViT adaptation is unpublished. This module is our ViT version of the
paper's recipe -- sample random per-layer widths inside a FLOPs budget, keep the best sample, fine-tune --
following ``../shared/research/baselines.md`` section 4.2. Label results as such.

What the method does
--------------------
* **Units.** Per block: attention heads (a head = its q/k/v rows of ``attn.qkv`` and its columns of
  ``attn.proj``) and MLP hidden channels (rows of ``mlp.fc1``, columns of ``mlp.fc2``) in groups of
  ``mlp_unit`` (auto: 64 where the hidden width has >= 12 such groups, e.g. ViT-B/L, else hidden/12).
  The embedding width D (residual stream, LoRA's input, the head) is kept.
* **Random sampling within the budget.** A candidate draws per-layer width ratios ``u ~ U[min_ratio, 1]``
  for heads and MLP independently (seeded ``random.Random(seed)``), scales them by one global factor
  found by bisection so the analytic MACs (:func:`pyra_bench.models.macs.vit_macs`) meet the budget,
  rounds to whole units (>= 1 head, >= 1 MLP group per block) and is accepted if its MAC fraction is
  within ``budget_tolerance`` of the budget (``low`` = 50 %, ``high`` = 29 %, ``flops:<f>``). The rescaling
  makes every draw land on the budget instead of rejecting almost all draws (uniform draws average ~55 %
  of the MACs); the per-layer distribution stays random. ``num_candidates`` distinct candidates are drawn
  at build time (so an unreachable budget fails before training; the floor is one head and one MLP group
  per block).
* **Channel choice inside a layer** (``criterion``): ``l1`` -- L1 norm of the LoRA-merged weights (a
  head: its qkv rows + proj columns; an MLP channel: its fc1 row + fc2 column), the usual criterion for
  pruning a pre-trained model; or ``random``. RaP reports no clear winner among criteria.
* **Selecting the best candidate** (start of stage ``prune``, after the LoRA stage): every candidate is
  pruned from a copy of the LoRA-trained model and scored by its cross-entropy on ``eval_batches`` fixed
  training batches (drawn under a fixed seed, no fine-tuning: the fine-tuning-free proxy); the lowest
  loss wins. Without data (``data=None``) the first candidate is taken, with a warning.
* **Physical pruning.** The chosen widths are cut out of the Linear layers in place (``weight``/``bias``
  rows or columns, ``in_features``/``out_features``, ``attn.num_heads``/``attn_dim``), so the inference
  model is smaller and faster by construction and :func:`~pyra_bench.models.macs.model_macs` counts it.
* **LoRA.** Pruning *slices* LoRA consistently instead of merging it: ``lora_b`` loses the rows of the
  pruned q/k/v channels, ``lora_a`` (input D) is unchanged. The pruned model computes exactly the
  LoRA-stage model with those heads/channels removed, and LoRA keeps training in stage ``retrain``.
* **Re-training** (``retrain_params``): ``lora`` (LoRA + head), ``lora+bias`` (+ the biases of the pruned
  blocks' Linear layers) or ``lora+bias+norm`` (default; + the blocks' and the final LayerNorm affine
  weights). PYRA's RaP reports 3.43 % / 0.86 % (ViT-B low/high) and 1.95 % / 0.65 % (ViT-L) "# params",
  i.e. LoRA + ~4.5 D^2 (low) / ~0.75 D^2 (high) for *both* depths (12 and 24 blocks), so it is not a
  per-block set. No natural set we tried reproduces both rates and depths (ViT-B: the blocks' biases and
  norms ~0.15 D^2; the pruned proj weights 6 D^2 / 3 D^2 at uniform low / high widths; LoRA pairs on proj
  and the MLP as well ~0.9 D^2 / ~0.7 D^2), so what PYRA re-trained is unknown. We take the smallest set
  beyond LoRA that touches every pruned layer (the "small parts" a pruned layer has, BitFit-style);
  ``lora`` gives plain LoRA. :meth:`paper_param_count` counts these extra parameters (LoRA, sliced with
  the qkv rows, is counted apart by :func:`~pyra_bench.models.params.count_parameters`).

Source tracing (:func:`pyra_bench.models.merging.trace_sources`): RaP prunes channels, never tokens, so every
patch keeps its own token through every block (``tests/test_trace.py``).

Stages: ``lora`` (LoRA + head on the full model) -> ``prune`` (selection + pruning at its start; then
``prune_epochs`` of recovery training -- the trainer runs at least one epoch) -> ``retrain``.

Deviations from the RaP paper and why
-------------------------------------
* Candidates are scored without per-candidate fine-tuning (RaP fine-tunes each sample briefly): K short
  trainings per VTAB task would multiply the cost, and PYRA's protocol has one pruning step.
* Widths are sampled around one global budget scale (see above) rather than by plain rejection.
* RaP samples channel counts per convolution; here the units are heads and MLP groups, and the MACs
  model is the ViT's (attention quadratic term included).
"""

from __future__ import annotations

import copy
import random
import warnings
from typing import Any, get_args

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from ..models.lora import LoRALinear
from ..models.macs import model_macs, vit_macs
from ..models.vit import UnsupportedModelError
from ..schema import Options
from . import options
from .base import METHODS, BuildContext, Method, Stage
from .spvit import BudgetError, parse_budget

STAGES = ("lora", "prune", "retrain")
RETRAIN_SETS = get_args(options.RaP.model_fields["retrain_params"].annotation)
CRITERIA = get_args(options.RaP.model_fields["criterion"].annotation)


# ---------------------------------------------------------------------------------------------------
# Physical pruning of timm ViT blocks
# ---------------------------------------------------------------------------------------------------
def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


@torch.no_grad()
def prune_linear_rows(lin: nn.Linear, rows: torch.Tensor) -> None:
    """Keep output features ``rows`` of ``lin`` (and the matching rows of a LoRA ``B``)."""
    lin.weight = _param(lin.weight[rows], lin.weight)
    if lin.bias is not None:
        lin.bias = _param(lin.bias[rows], lin.bias)
    lin.out_features = len(rows)
    if isinstance(lin, LoRALinear):
        lin.lora_b.weight = _param(lin.lora_b.weight[rows], lin.lora_b.weight)
        lin.lora_b.out_features = len(rows)


@torch.no_grad()
def prune_linear_cols(lin: nn.Linear, cols: torch.Tensor) -> None:
    """Keep input features ``cols`` of ``lin`` (and the matching columns of a LoRA ``A``)."""
    lin.weight = _param(lin.weight[:, cols], lin.weight)
    lin.in_features = len(cols)
    if isinstance(lin, LoRALinear):
        lin.lora_a.weight = _param(lin.lora_a.weight[:, cols], lin.lora_a.weight)
        lin.lora_a.in_features = len(cols)


@torch.no_grad()
def _prune_norm(norm: nn.Module, idx: torch.Tensor) -> None:
    if isinstance(norm, nn.Identity):
        return
    if not isinstance(norm, nn.LayerNorm):
        raise TypeError(f"cannot prune a {type(norm).__name__} over pruned channels")
    if norm.weight is not None:
        norm.weight = _param(norm.weight[idx], norm.weight)
    if norm.bias is not None:
        norm.bias = _param(norm.bias[idx], norm.bias)
    norm.normalized_shape = (len(idx),)


def prune_block(blk: nn.Module, heads: list[int], mlp: list[int]) -> None:
    """Keep attention heads ``heads`` and MLP hidden channels ``mlp`` (indices into the current layers)."""
    attn = blk.attn
    H, hd = attn.num_heads, attn.head_dim
    if not heads or not mlp:
        raise ValueError("a block keeps at least one head and one MLP channel")
    if type(blk.mlp) is not Mlp:
        raise TypeError(f"only timm's plain Mlp can be channel-pruned, got {type(blk.mlp).__name__}")
    dev = attn.qkv.weight.device
    h = torch.as_tensor(sorted(heads), device=dev)
    within = (h[:, None] * hd + torch.arange(hd, device=dev)).reshape(-1)  # (len(heads) * hd,)
    rows = torch.cat([within + j * H * hd for j in range(3)])  # q, k, v sections
    prune_linear_rows(attn.qkv, rows)
    prune_linear_cols(attn.proj, within)
    _prune_norm(attn.norm, within)
    if getattr(attn, "prefix", None) is not None:  # peft=prefix: its keys/values lose the pruned heads too
        attn.prefix.keep_heads(h, hd)
    attn.num_heads = len(heads)
    attn.attn_dim = len(heads) * hd
    c = torch.as_tensor(sorted(mlp), device=dev)
    prune_linear_rows(blk.mlp.fc1, c)
    prune_linear_cols(blk.mlp.fc2, c)
    _prune_norm(blk.mlp.norm, c)


def _lin_weight(lin: nn.Linear) -> torch.Tensor:
    w = lin.weight.detach().float()
    if isinstance(lin, LoRALinear) and not lin.merged:
        w = w + lin.delta_weight().detach()
    return w


@torch.no_grad()
def l1_head_scores(blk: nn.Module) -> torch.Tensor:
    attn = blk.attn
    H, hd = attn.num_heads, attn.head_dim
    qkv = _lin_weight(attn.qkv).abs().reshape(3, H, hd, -1).sum(dim=(0, 2, 3))
    proj = _lin_weight(attn.proj).abs().reshape(-1, H, hd).sum(dim=(0, 2))
    return (qkv + proj).cpu()


@torch.no_grad()
def l1_mlp_scores(blk: nn.Module) -> torch.Tensor:
    return (_lin_weight(blk.mlp.fc1).abs().sum(1) + _lin_weight(blk.mlp.fc2).abs().sum(0)).cpu()


def check_device(o: Options, name: str, device: Any) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:<i>`` or ``mps``, and present on this machine."""
    rule = o.model_fields[name].json_schema_extra["rule"]
    if not isinstance(device, str):
        o.wrong_type(name, device, rule)
    if device == "auto":
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        o.fail(name, device, rule)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= n:
            o.fail(name, device, rule, why=f"this machine has {n} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            o.fail(name, device, rule, why="MPS is not available here")
    elif dev.type != "cpu":
        o.fail(name, device, rule)
    return device


def encode_mask(indices: list[int]) -> str:
    """Sorted channel indices -> hexadecimal bit mask (bit i set = channel i kept)."""
    return format(sum(1 << int(i) for i in indices), "x")


def decode_mask(mask: str) -> list[int]:
    v = int(mask, 16)
    return [i for i in range(v.bit_length()) if v >> i & 1]


def auto_mlp_unit(hidden: int) -> int:
    unit = 64 if hidden % 64 == 0 and hidden // 64 >= 12 else max(1, hidden // 12)
    return unit if hidden % unit == 0 else 1


# ---------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------
@METHODS.register("rap")
class RaPMethod(Method):
    """RaP + LoRA (our ViT design, see the module docstring). ``schedule``: ``low``/``high``/``flops:<f>``."""

    name = "rap"
    display_name = "RaP"
    cost_factor = 2.0  # GPU time of a run relative to PEFT (sweep estimates without records)
    param_group = "rap"
    options = options.RaP

    def __init__(self, schedule: Any = "low", **kwargs: Any):
        super().__init__(schedule, **kwargs)
        o = self.opts
        self.num_candidates, self.eval_batches, self.criterion = o.num_candidates, o.eval_batches, o.criterion
        self.min_ratio, self.budget_tolerance, self.mlp_unit_opt = o.min_ratio, o.budget_tolerance, o.mlp_unit
        self.seed, self.retrain_params, self.max_draws = o.seed, o.retrain_params, o.max_draws
        self.device = check_device(o, "device", o.device)
        self.epochs = {s: getattr(o, f"{s}_epochs") for s in ("lora", "prune", "retrain")}
        if parse_budget(schedule, self.name) is None:  # the form, before any work
            raise BudgetError("method 'rap' prunes channels to a FLOPs budget: use compression=low|high|"
                              f"flops:<fraction>, got compression={schedule!r}")
        self.stage = "init"
        self.budget: float | None = None
        self.candidates: list[dict[str, Any]] = []
        self.chosen: int | None = None
        self.selection = None
        self.kept_heads: list[list[int]] | None = None
        self.kept_mlp: list[list[int]] | None = None
        self.macs_fraction = 1.0

    # -- building -----------------------------------------------------------------------------------
    def resolve_schedule(self, ctx: BuildContext) -> list[int]:
        parse_budget(self.schedule_spec, self.name)  # the form (checked at construction too)
        return [0] * ctx.depth

    def apply(self, model: nn.Module, ctx: BuildContext) -> None:
        self.schedule = self.resolve_schedule(ctx)
        self.budget = parse_budget(self.schedule_spec, self.name)
        blocks = list(model.blocks)
        self.heads_full = [b.attn.num_heads for b in blocks]
        self.head_dims = [b.attn.head_dim for b in blocks]
        self.hidden_full = [b.mlp.fc1.out_features for b in blocks]
        for i, b in enumerate(blocks):
            if type(b.mlp) is not Mlp:
                raise UnsupportedModelError(f"rap: block {i} has a {type(b.mlp).__name__} MLP; only timm's plain "
                                            "Mlp can be channel-pruned: use a plain ViT backbone with method=rap")
        self.units = [int(self.mlp_unit_opt) if self.mlp_unit_opt else auto_mlp_unit(h) for h in self.hidden_full]
        for u, h in zip(self.units, self.hidden_full):
            if h % u:
                divisors = [d for d in range(1, max(1, h // 12) + 1) if h % d == 0][-4:]
                self.opts.fail(
                    "mlp_unit", u, f"null (auto) or a divisor of the MLP width {h}, e.g. {divisors}",
                    why=f"it does not divide the MLP width {h} of backbone {ctx.backbone.name!r}")
        pe = model.patch_embed
        self._tokens = ctx.num_tokens
        self._dim = ctx.dim
        self._patch = (pe.num_patches, pe.proj.in_channels * pe.proj.kernel_size[0] * pe.proj.kernel_size[1])
        self.full_macs = model_macs(model)
        self.floor_fraction = self._fraction([1] * len(blocks), self.units)
        if self.budget < self.floor_fraction - self.budget_tolerance:
            raise BudgetError(
                f"rap: a budget of {self.budget:.3f} of the backbone's MACs is below the reachable floor "
                f"{self.floor_fraction:.3f} (one head and one MLP group of {self.units[0]} channels per block; the "
                "patch embedding and the embedding width are not pruned)")
        self.candidates = self.sample_candidates()

    def _fraction(self, heads: list[float], mlp: list[float]) -> float:
        L = len(heads)
        n = [self._tokens] * L
        macs = vit_macs(n, n, self._dim, [h * d for h, d in zip(heads, self.head_dims)], mlp,
                        self._patch[0], self._patch[1])
        return macs / self.full_macs

    def _widths(self, uh, um, groups, c, rounded=False):
        """Heads and MLP channels per block for ratios ``uh``/``um`` scaled by ``c`` (continuous or rounded)."""
        h = [min(1.0, max(1.0 / H, c * u)) * H for u, H in zip(uh, self.heads_full)]
        m = [min(1.0, max(1.0 / G, c * u)) * G for u, G in zip(um, groups)]
        if rounded:
            h = [min(H, max(1, round(x))) for x, H in zip(h, self.heads_full)]
            m = [min(G, max(1, round(x))) for x, G in zip(m, groups)]
        return h, [x * u for x, u in zip(m, self.units)]

    def sample_candidates(self) -> list[dict[str, Any]]:
        """``num_candidates`` distinct random width configurations on the budget (seeded)."""
        rng = random.Random(self.seed)
        L, f, tol = len(self.heads_full), self.budget, self.budget_tolerance
        groups = [h // u for h, u in zip(self.hidden_full, self.units)]
        out, seen = [], set()
        for _ in range(self.max_draws):
            if len(out) >= self.num_candidates:
                break
            uh = [rng.uniform(self.min_ratio, 1.0) for _ in range(L)]
            um = [rng.uniform(self.min_ratio, 1.0) for _ in range(L)]
            lo, hi = 0.0, 1.0 / min(uh + um)
            for _ in range(50):  # the global scale that puts these random ratios on the budget
                mid = (lo + hi) / 2
                if self._fraction(*self._widths(uh, um, groups, mid)) <= f:
                    lo = mid
                else:
                    hi = mid
            heads, mlp = self._widths(uh, um, groups, (lo + hi) / 2, rounded=True)
            frac = self._fraction(heads, mlp)
            key = (tuple(heads), tuple(mlp))
            if abs(frac - f) <= tol and key not in seen:
                seen.add(key)
                out.append({"heads": heads, "mlp": mlp, "macs_fraction": frac})
        if not out:
            raise BudgetError(f"rap: no width configuration within {tol} of the budget {f:.3f} in {self.max_draws} "
                              "draws (too coarse units for this backbone?); raise budget_tolerance")
        if len(out) < self.num_candidates:
            warnings.warn(f"rap: only {len(out)} distinct candidates found for the budget {f:.3f}", stacklevel=2)
        return out

    # -- choosing channels --------------------------------------------------------------------------
    def rankings(self, model: nn.Module) -> tuple[list[list[int]], list[list[int]]]:
        """Per block, head and MLP-channel indices by decreasing importance (on the unpruned model)."""
        heads, mlp = [], []
        for i, blk in enumerate(model.blocks):
            if self.criterion == "l1":
                hs, ms = l1_head_scores(blk), l1_mlp_scores(blk)
                heads.append(torch.sort(hs, descending=True, stable=True).indices.tolist())
                mlp.append(torch.sort(ms, descending=True, stable=True).indices.tolist())
            else:
                r = random.Random(f"rap-{self.seed}-{i}")
                heads.append(r.sample(range(blk.attn.num_heads), blk.attn.num_heads))
                mlp.append(r.sample(range(blk.mlp.fc1.out_features), blk.mlp.fc1.out_features))
        return heads, mlp

    @staticmethod
    def kept_indices(rank_h, rank_m, cand) -> tuple[list[list[int]], list[list[int]]]:
        return ([sorted(r[:h]) for r, h in zip(rank_h, cand["heads"])],
                [sorted(r[:m]) for r, m in zip(rank_m, cand["mlp"])])

    def _is_pruned(self, model: nn.Module) -> bool:
        return any(b.attn.num_heads != H or b.mlp.fc1.out_features != m
                   for b, H, m in zip(model.blocks, self.heads_full, self.hidden_full))

    def prune(self, model: nn.Module, heads: list[list[int]], mlp: list[list[int]]) -> None:
        for blk, h, m in zip(model.blocks, heads, mlp):
            prune_block(blk, h, m)

    def _score_device(self, model: nn.Module) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda") if torch.cuda.is_available() else next(model.parameters()).device
        return torch.device(self.device)

    @torch.no_grad()
    def select(self, model: nn.Module, data: Any) -> None:
        """Score every candidate on fixed training batches and prune ``model`` to the best one."""
        rank_h, rank_m = self.rankings(model)
        batches = _fixed_batches(data, self.eval_batches, self.seed) if data is not None else []
        if not batches:
            warnings.warn("rap: no training data at the prune stage; taking the first random candidate "
                          "(no data-driven selection)", stacklevel=2)
            self.chosen, self.selection = 0, "first (no data)"
        else:
            dev, home, was_training = self._score_device(model), next(model.parameters()).device, model.training
            model.to(dev)
            try:
                for cand in self.candidates:
                    pruned = copy.deepcopy(model)
                    self.prune(pruned, *self.kept_indices(rank_h, rank_m, cand))
                    pruned.eval()
                    loss = correct = n = 0.0
                    for x, y in batches:
                        x, y = x.to(dev), y.to(dev)
                        logits = pruned(x).float()
                        loss += F.cross_entropy(logits, y, reduction="sum").item()
                        correct += (logits.argmax(-1) == y).sum().item()
                        n += len(y)
                    cand["loss"], cand["acc"] = loss / n, 100.0 * correct / n
                    del pruned
            finally:
                model.to(home)
                model.train(was_training)
            self.chosen = min(range(len(self.candidates)), key=lambda i: self.candidates[i]["loss"])
            self.selection = f"lowest cross-entropy on {int(n)} training images"
        cand = self.candidates[self.chosen]
        self.kept_heads, self.kept_mlp = self.kept_indices(rank_h, rank_m, cand)
        self.prune(model, self.kept_heads, self.kept_mlp)
        self.macs_fraction = model_macs(model) / self.full_macs

    def _set_trainable(self, model: nn.Module) -> None:
        parts = self.retrain_params.split("+")
        for blk in model.blocks:
            if "bias" in parts:
                for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
                    if lin.bias is not None:
                        lin.bias.requires_grad_(True)
            if "norm" in parts:
                blk.norm1.requires_grad_(True)
                blk.norm2.requires_grad_(True)
        if "norm" in parts:
            for name in ("norm", "fc_norm"):
                mod = getattr(model, name, None)
                if isinstance(mod, nn.LayerNorm):
                    mod.requires_grad_(True)

    # -- stages -------------------------------------------------------------------------------------
    def stages(self) -> list[Stage]:
        return [Stage("lora", self.epochs["lora"], evaluate=False),
                Stage("prune", self.epochs["prune"], evaluate=False),
                Stage("retrain", self.epochs["retrain"], evaluate=True)]

    def on_stage_start(self, stage: Stage, model: nn.Module, data: Any = None) -> None:
        if stage.name not in STAGES:
            raise ValueError(f"unknown rap stage {stage.name!r}; valid: {', '.join(STAGES)}")
        self.stage = stage.name
        if stage.name == "lora":
            return
        if self.kept_heads is None:
            self.select(model, data)
        elif not self._is_pruned(model):
            self.prune(model, self.kept_heads, self.kept_mlp)
        self._set_trainable(model)

    # -- checkpoints --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"schedule": list(self.schedule), "stage": self.stage, "budget": self.budget,
                "macs_fraction": self.macs_fraction, "criterion": self.criterion, "seed": self.seed,
                "retrain_params": self.retrain_params, "candidates": self.candidates, "chosen": self.chosen,
                "selection": self.selection, "heads": self.kept_heads,
                # kept MLP channels as hexadecimal bit masks (bit i = channel i): ViT-L's index lists would
                # make every run record ~0.5 MB
                "mlp_mask": None if self.kept_mlp is None else [encode_mask(m) for m in self.kept_mlp]}

    def restore(self, model: nn.Module, state: dict[str, Any]) -> None:
        self.stage = state.get("stage", "init")
        self.candidates = [dict(c) for c in state.get("candidates", self.candidates)]
        self.chosen, self.selection = state.get("chosen"), state.get("selection")
        self.macs_fraction = float(state.get("macs_fraction", 1.0))
        if state.get("heads") is None:
            return
        heads = [list(map(int, h)) for h in state["heads"]]
        mlp = [decode_mask(m) for m in state["mlp_mask"]]
        if self._is_pruned(model):
            if heads != self.kept_heads or mlp != self.kept_mlp or any(
                    b.attn.num_heads != len(h) or b.mlp.fc1.out_features != len(m)
                    for b, h, m in zip(model.blocks, heads, mlp)):
                raise ValueError("rap.restore: the model is already pruned to a different configuration; "
                                 "restore into a freshly built model")
        else:
            self.prune(model, heads, mlp)
        self.kept_heads, self.kept_mlp = heads, mlp
        if self.stage in ("prune", "retrain"):
            self._set_trainable(model)

    # -- accounting ---------------------------------------------------------------------------------
    def paper_param_count(self, model: nn.Module) -> int:
        """The re-trained parameters beyond LoRA and the head (biases / norms per ``retrain_params``)."""
        return sum(p.numel() for p in self.method_parameters(model).values())

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "budget": self.budget, "macs_fraction": self.macs_fraction,
                "heads": None if self.kept_heads is None else [len(h) for h in self.kept_heads],
                "mlp": None if self.kept_mlp is None else [len(m) for m in self.kept_mlp],
                "criterion": self.criterion, "retrain_params": self.retrain_params, "selection": self.selection}


def _fixed_batches(data: Any, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` batches of ``data.train_dataloader()``, drawn under a fixed seed (so a resumed run
    scores candidates on the same images) without disturbing the global RNG."""
    if n <= 0:
        return []
    try:
        dl = data.train_dataloader()
    except Exception:
        if not hasattr(data, "setup"):
            raise
        data.setup("fit")
        dl = data.train_dataloader()
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, batch in enumerate(dl):
            if i >= n:
                break
            x = data.normalize(batch[0]) if hasattr(data, "normalize") else batch[0]  # cached uint8 -> input
            out.append((x, batch[1]))
    return out
