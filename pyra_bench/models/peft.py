"""The ``peft`` choices: how the frozen ViT is adapted (``conf/peft/<choice>.yaml``; the options' schema is
:data:`pyra_bench.schema.PEFT_CHOICES`). Every choice composes with every token-reduction method.

* ``lora`` (the default, the paper's): LoRA on each attention's qkv (:mod:`pyra_bench.models.lora`); it
  **folds** into the qkv weights for inference (no extra cost).
* ``adapter``: a bottleneck on each block's MLP branch, as the official PYRA/NOAH code
  (``model/vision_transformer_timm.py``: ``x = x + adapter(drop_path(mlp(norm2(x))))``, ``adapter(h) = h +
  up(dropout(QuickGELU(down(h))))``): Linear D -> d, QuickGELU (``x * sigmoid(1.702 x)``), dropout, Linear
  d -> D, with its own residual on the branch ``h`` (layer scale, DINOv2: ``h = drop_path2(ls2(mlp(..)))``).
  ``init=standard``: the module's own initialisation (xavier-uniform weights, N(0, 1e-6) biases);
  ``init=authors``: what the official code's global weight-init pass leaves (it runs after the modules
  are built: trunc-normal(0.02) weights, zero biases).
* ``vpt``: VPT-deep (Jia et al. 2022): ``num_tokens`` learned prompt tokens per block, inserted after the
  prefix tokens (class, distillation, registers), *replaced* by the block's own at every block (block 0's
  are the inserted ones), protected from merging and pruning like the class token (they raise the
  protected count) and dropped before the final norm and the head. Dropout on the prompts as the
  official code (``drop_rate_prompt``); xavier-uniform initialisation of a (1, P, D) tensor as it. The
  official code appends its prompts after the patch tokens and keeps one more model-level set (with a
  position embedding) through all blocks; that extra set is not reproduced (VPT-deep's definition).
* ``prefix``: prefix tuning: ``num_tokens`` learned keys and values per attention, appended to the keys
  and values (not the queries, not the outputs); under ToMe's proportional attention they count as
  size-1 tokens (log 1 = 0 bias); the block's token reducer sees the tokens' own queries and keys only.
  Xavier-uniform (1, P, D) tensors as the official code (whose forward concatenates them with
  mismatched shapes and so never ran; the official ``prefix_drop`` is never applied: no dropout).

Adapter, prompts and prefix do **not** fold: the inference model keeps them, and their cost is in the
analytic MACs (:mod:`pyra_bench.models.macs`: ``2 N D d`` per adapter, the prompts' extra tokens, the
prefix's extra keys and values) and in the measured speed. Their parameters are PEFT parameters, not the
method's (:func:`peft_parameter_names`), counted the way the paper counts trainable parameters
(:func:`pyra_bench.models.params.count_parameters`: all of them; the head apart).

Validation is the schema's (:func:`make_peft` checks options through :mod:`pyra_bench.schema`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .lora import add_lora_to_qkv
from .macs import ViTGeometry


class PeftModule(nn.Module):
    """Base class of the non-LoRA PEFT modules (their parameters are PEFT parameters)."""


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Adapter(PeftModule):
    """``h + up(dropout(QuickGELU(down(h))))`` on a block's MLP branch ``h`` (the official ``Adapter``)."""

    def __init__(self, dim: int, bottleneck: int, dropout: float = 0.1, init: str = "standard"):
        super().__init__()
        self.bottleneck = int(bottleneck)
        self.down = nn.Linear(dim, self.bottleneck)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(self.bottleneck, dim)
        for lin in (self.down, self.up):
            if init == "authors":
                nn.init.trunc_normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            else:
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.dropout(self.act(self.down(h))))


def _xavier(shape: tuple[int, ...]) -> nn.Parameter:
    t = torch.empty(shape)
    if t.device.type != "meta":
        nn.init.xavier_uniform_(t)
    return nn.Parameter(t)


class PromptTokens(PeftModule):
    """One block's VPT-deep prompts: ``forward(x)`` replaces tokens ``offset .. offset + P`` of ``x``."""

    def __init__(self, num_tokens: int, dim: int, offset: int, dropout: float = 0.1):
        super().__init__()
        self.num_tokens, self.offset = int(num_tokens), int(offset)
        self.tokens = _xavier((1, self.num_tokens, dim))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o, P = self.offset, self.num_tokens
        p = self.dropout(self.tokens.to(x.dtype)).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :o], p, x[:, o + P:]], dim=1)


class PrefixKV(PeftModule):
    """One attention's learned prefix keys and values, (1, P, attn_dim) each (heads split as qkv's)."""

    def __init__(self, num_tokens: int, attn_dim: int):
        super().__init__()
        self.num_tokens = int(num_tokens)
        self.keys = _xavier((1, self.num_tokens, attn_dim))
        self.values = _xavier((1, self.num_tokens, attn_dim))

    def _heads(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        B, H, _, hd = like.shape
        return t.to(like.dtype).view(1, self.num_tokens, H, hd).transpose(1, 2).expand(B, -1, -1, -1)

    def extend(self, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None):
        """The keys and values (B, H, N, hd) with the prefix appended, and the proportional-attention bias
        (B, 1, 1, N) with a 0 (= log 1: size-1 tokens) for each prefix key (None stays None)."""
        k = torch.cat([k, self._heads(self.keys, k)], dim=2)
        v = torch.cat([v, self._heads(self.values, v)], dim=2)
        return k, v, None if bias is None else F.pad(bias, (0, self.num_tokens))

    @torch.no_grad()
    def keep_heads(self, heads: torch.Tensor, head_dim: int) -> None:
        """Keep attention heads ``heads`` (a channel-pruned attention, RaP)."""
        cols = (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)).reshape(-1)
        for name in ("keys", "values"):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(old[..., cols].clone(), requires_grad=old.requires_grad))


# ---------------------------------------------------------------------------------------------------------
# The choices
# ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Peft:
    """One ``peft`` choice: its validated options (``opts``, the choice's class in
    :data:`pyra_bench.schema.PEFT_CHOICES`, where each option is declared once) and how it adapts the model;
    :meth:`apply` adds its trainable modules to the frozen, patched ViT."""

    opts: Any
    #: whether it folds into the frozen weights for inference (LoRA) or stays in the inference model
    folds: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.opts.name

    @property
    def prompt_tokens(self) -> int:
        """Tokens it adds to every block's input (protected from merging and pruning)."""
        return 0

    def apply(self, model: nn.Module, spec: Any) -> None:
        raise NotImplementedError

    def geometry(self, g: ViTGeometry, spec: Any) -> ViTGeometry:
        """The matmul shape of the model once applied (``g``: the backbone's; known before the modules are
        added, so a method's schedule is checked before any weights are read)."""
        return g

    def options(self) -> dict[str, Any]:
        return self.opts.model_dump(exclude={"name"})


class LoraPeft(Peft):
    folds = True

    def apply(self, model: nn.Module, spec: Any) -> None:
        o = self.opts
        add_lora_to_qkv(model, spec.lora_rank if o.rank is None else o.rank, alpha=o.alpha, dropout=o.dropout,
                        init=o.init)


class AdapterPeft(Peft):
    def bottleneck(self, spec: Any) -> int:
        """``peft.dim``; None: the backbone's adapter_dim (4 / 8 / 12 for ViT-S / B / L)."""
        return int(self.opts.dim if self.opts.dim is not None else spec.peft_dim)

    def apply(self, model: nn.Module, spec: Any) -> None:
        d = self.bottleneck(spec)
        for blk in model.blocks:
            blk.adapter = Adapter(model.embed_dim, d, self.opts.dropout, self.opts.init).to(blk.mlp.fc1.weight.device)

    def geometry(self, g: ViTGeometry, spec: Any) -> ViTGeometry:
        return dataclasses.replace(g, adapter_dims=(self.bottleneck(spec),) * g.depth)


class VptPeft(Peft):
    @property
    def prompt_tokens(self) -> int:
        return self.opts.num_tokens

    def apply(self, model: nn.Module, spec: Any) -> None:
        offset = int(model.num_prefix_tokens)
        for blk in model.blocks:
            blk.prompts = PromptTokens(self.opts.num_tokens, model.embed_dim, offset, self.opts.dropout).to(
                blk.mlp.fc1.weight.device)
        model.num_prompt_tokens = self.opts.num_tokens

    def geometry(self, g: ViTGeometry, spec: Any) -> ViTGeometry:
        return dataclasses.replace(g, num_tokens=g.num_tokens + self.opts.num_tokens)


class PrefixPeft(Peft):
    def apply(self, model: nn.Module, spec: Any) -> None:
        for blk in model.blocks:
            attn = blk.attn
            attn.prefix = PrefixKV(self.opts.num_tokens, attn.qkv.out_features // 3).to(attn.qkv.weight.device)

    def geometry(self, g: ViTGeometry, spec: Any) -> ViTGeometry:
        return dataclasses.replace(g, extra_keys=self.opts.num_tokens)


PEFTS: dict[str, type[Peft]] = {"lora": LoraPeft, "adapter": AdapterPeft, "vpt": VptPeft, "prefix": PrefixPeft}
#: The default choice (its runs' ids and records carry no peft part).
DEFAULT_PEFT = "lora"


def make_peft(options: Mapping[str, Any] | Peft | None = None) -> Peft:
    """The :class:`Peft` of a ``peft`` config (``{"name": "adapter", "dim": 8}``; None: LoRA's defaults),
    validated by the schema (:func:`pyra_bench.schema.check_peft`: one line per problem, naming the key,
    the value and what is allowed)."""
    if isinstance(options, Peft):
        return options
    from ..schema import check_peft

    opts = check_peft(dict(options or {}))
    return PEFTS[opts.name](opts)


def peft_parameter_names(model: nn.Module) -> set[str]:
    """The names of the parameters of every PEFT module of ``model`` (LoRA's ``.lora_`` ones included)."""
    names = {n for n, _ in model.named_parameters() if ".lora_" in n}
    for prefix, m in model.named_modules():
        if isinstance(m, PeftModule):
            names |= {f"{prefix}.{n}" for n, _ in m.named_parameters()}
    return names
