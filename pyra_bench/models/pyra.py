"""PYRA: Parallel Yielding Re-Activation (paper Sec. 3.2, spec section 3) and the paper's ablations.

A modulator sits inside one block's merge. It receives the size-weighted source tokens ``M_s`` (B, r, D),
ordered by descending similarity, and their pre-merge destinations ``M_t`` (B, r, D), and returns the
modulated sources; the size-weighted merge then proceeds as in ToMe (:func:`merging.merge_wavg`).

PYRA (``variant="full"``), per block with r merges::

    M_info  = LayerNorm(M_s + M_t)                          (eq. 4)
    delta_D = W_r^T M_info   -> (B, 1, D), one weight per channel      (eq. 5)
    delta_r = M_info W_D^T   -> (B, r, 1), one weight per merged pair  (eq. 5)
    M_s    <- M_s + (2 sigmoid(delta_r) - 1) * (2 sigmoid(delta_D) * M_s)   (eqs. 6-7)

W_D starts at zero, so a fresh PYRA model computes exactly the ToMe model's function.

Ablation variants (Tables 6-8). Where the paper leaves a detail open, the choice is stated:

* ``wr`` / ``wr_sigmoid``: W_r only; ``M_s + delta_D * M_s`` / ``M_s + (2 sigmoid(delta_D) - 1) * M_s``.
* ``wd`` / ``wd_sigmoid``: W_D only; ``M_s + delta_r * M_s`` / ``M_s + (2 sigmoid(delta_r) - 1) * M_s``.
  (Sec. 4.3: "omit eq. 6 and replace the weight in eq. 7 by the employed generator's". With a single
  generator the generator starts at zero so the variant, like PYRA, starts as the identity.)
* ``wrwd_plain``: both generators, no sigmoid: ``M_s + delta_r * delta_D * M_s`` (reading "remove the
  sigmoid" so that the re-activation residual stays an identity at initialisation).
* ``direct``: a learned ``W in R^{r x D}`` per block, ``M_s + (2 sigmoid(W) - 1) * M_s`` (Table 7), W = 0 at init.
* ``gated``: a two-layer MLP generator D -> 4 -> D on ``M_info`` (Table 8), no biases (the paper's 73.73K
  count is 12 x (768*4 + 4*768)), GELU in between, last layer zero at init.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import nn

from ..methods.options import PYRA as PYRAOptions
from ..registry import Registry

MODULATORS: Registry[type[nn.Module]] = Registry("PYRA variant")
WR_INITS = get_args(PYRAOptions.model_fields["wr_init"].annotation)


def check_modulator_options(variant: object = "full", wr_init: object = "uniform",
                            ln_eps: object = 1e-5) -> tuple[str, str, float]:
    """Validate PYRA's options (``method.kwargs.variant/wr_init/ln_eps``); returns them converted."""
    o = PYRAOptions.check({"variant": variant, "wr_init": wr_init, "ln_eps": ln_eps})
    if not isinstance(variant, str):
        o.wrong_type("variant", variant, f"one of the valid choices: {', '.join(MODULATORS.names())}")
    MODULATORS.get(o.variant)  # UnknownChoiceError (a KeyError) listing the variants
    return o.variant, o.wr_init, o.ln_eps


class _Modulator(nn.Module):
    """Common part: the token-information LayerNorm of eq. 4 (affine, eps 1e-5 as in the authors' code)."""

    uses_info = True

    def __init__(self, r: int, dim: int, ln_eps: float = 1e-5):
        super().__init__()
        self.r, self.dim = r, dim
        self.norm = nn.LayerNorm(dim, eps=ln_eps) if self.uses_info else None

    def info(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.norm(s + t)

    def gate(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The modulation weight ``w`` with ``forward(s, t) = s + w * s`` (broadcastable to ``s``); its mean over
        channels is the per-token modulation strength that source tracing records."""
        raise NotImplementedError

    def paper_param_count(self) -> int:
        """Parameters the paper counts for token modulation (generators only, not the LayerNorm)."""
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith("norm."))


def _init_wr(w: torch.Tensor, init: str) -> None:
    if init == "uniform":  # the authors' code: kaiming_uniform(a=sqrt(5)) on (r, 1) = U(-1, 1)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    elif init == "normal":  # the paper's text: random Gaussian
        nn.init.normal_(w, std=1.0)
    elif init == "zeros":
        nn.init.zeros_(w)
    else:
        PYRAOptions.check({"wr_init": init})


@MODULATORS.register("full")
class PYRA(_Modulator):
    def __init__(self, r: int, dim: int, wr_init: str = "uniform", ln_eps: float = 1e-5):
        super().__init__(r, dim, ln_eps)
        self.w_r = nn.Parameter(torch.empty(r, 1))
        self.w_d = nn.Parameter(torch.zeros(1, dim))
        _init_wr(self.w_r, wr_init)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = self.info(s, t)  # (B, r, D)
        delta_d = (m * self.w_r).sum(dim=1, keepdim=True)  # W_r^T M_info: (B, 1, D)
        delta_r = m @ self.w_d.t()  # M_info W_D^T: (B, r, 1)
        return s + (2 * torch.sigmoid(delta_r) - 1) * (2 * torch.sigmoid(delta_d) * s)

    def gate(self, s, t):
        m = self.info(s, t)
        return (2 * torch.sigmoid(m @ self.w_d.t()) - 1) * (2 * torch.sigmoid((m * self.w_r).sum(dim=1, keepdim=True)))


class _SingleGenerator(_Modulator):
    sigmoid = True

    def __init__(self, r: int, dim: int, ln_eps: float = 1e-5, **_: object):
        super().__init__(r, dim, ln_eps)

    def weight(self, m: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gate(self, s, t):
        w = self.weight(self.info(s, t))
        return (2 * torch.sigmoid(w) - 1) if self.sigmoid else w

    def forward(self, s, t):
        return s + self.gate(s, t) * s


@MODULATORS.register("wr")
class PlainWr(_SingleGenerator):
    sigmoid = False

    def __init__(self, r: int, dim: int, ln_eps: float = 1e-5, **_: object):
        super().__init__(r, dim, ln_eps)
        self.w_r = nn.Parameter(torch.zeros(r, 1))

    def weight(self, m):
        return (m * self.w_r).sum(dim=1, keepdim=True)


@MODULATORS.register("wr_sigmoid")
class SigmoidWr(PlainWr):
    sigmoid = True


@MODULATORS.register("wd")
class PlainWd(_SingleGenerator):
    sigmoid = False

    def __init__(self, r: int, dim: int, ln_eps: float = 1e-5, **_: object):
        super().__init__(r, dim, ln_eps)
        self.w_d = nn.Parameter(torch.zeros(1, dim))

    def weight(self, m):
        return m @ self.w_d.t()


@MODULATORS.register("wd_sigmoid")
class SigmoidWd(PlainWd):
    sigmoid = True


@MODULATORS.register("wrwd_plain")
class PlainWrWd(PYRA):
    def forward(self, s, t):
        m = self.info(s, t)
        delta_d = (m * self.w_r).sum(dim=1, keepdim=True)
        delta_r = m @ self.w_d.t()
        return s + delta_r * delta_d * s

    def gate(self, s, t):
        m = self.info(s, t)
        return (m @ self.w_d.t()) * (m * self.w_r).sum(dim=1, keepdim=True)


@MODULATORS.register("direct")
class DirectW(_SingleGenerator):
    """Table 7: modulation weights learned directly, not generated from the tokens (no LayerNorm)."""

    uses_info = False

    def __init__(self, r: int, dim: int, ln_eps: float = 1e-5, **_: object):
        super().__init__(r, dim, ln_eps)
        self.w = nn.Parameter(torch.zeros(r, dim))

    def gate(self, s, t):
        return 2 * torch.sigmoid(self.w) - 1


@MODULATORS.register("gated")
class GatedMLP(_SingleGenerator):
    def __init__(self, r: int, dim: int, ln_eps: float = 1e-5, hidden: int = 4, **_: object):
        super().__init__(r, dim, ln_eps)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.fc2.weight)

    def weight(self, m):
        return self.fc2(self.act(self.fc1(m)))


PYRA_VARIANTS = MODULATORS.names()


def build_modulator(variant: str, r: int, dim: int, **kwargs) -> nn.Module:
    check_modulator_options(variant, kwargs.get("wr_init", "uniform"), kwargs.get("ln_eps", 1e-5))
    cls = MODULATORS.get(variant)
    if cls is PYRA or issubclass(cls, PYRA):
        kwargs = {k: v for k, v in kwargs.items() if k in ("wr_init", "ln_eps")}
    return cls(r, dim, **kwargs)
