"""Parameter accounting as the paper reports it (Table 1, "# params" columns; spec sections 3-4).

The paper's percentage is (LoRA + the method's counted parameters) / backbone parameters, where the
backbone excludes the classifier head; the head (and PYRA's LayerNorm affine weights) are trained but not
counted. Both the paper's count and the full trainable count are reported.

A ``peft`` choice other than LoRA (:mod:`pyra_bench.models.peft`: adapters, VPT's prompts, prefix keys and
values) is counted in full under ``peft`` (``lora`` is then 0), as the official code counts its
"adapter" / "prompt" / "prefix" parameters; it is part of ``paper_counted``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn


@dataclass(frozen=True)
class ParamCount:
    trainable: int  # everything with requires_grad (LoRA + head + method)
    lora: int
    head: int
    method: int  # the method's own trainable parameters
    method_paper: int  # ... as the paper counts them
    backbone: int  # the backbone without the head, as built (before any channel pruning)
    paper_counted: int  # lora + peft + method_paper
    paper_pct: float  # 100 * paper_counted / backbone
    peft: int = 0  # the non-LoRA PEFT modules' trainable parameters (adapter, prompts, prefix)

    def as_dict(self) -> dict:
        return asdict(self)


def _is_head(name: str) -> bool:
    return name.startswith(("head.", "head_dist."))


def count_parameters(model: nn.Module, method=None) -> ParamCount:
    from .peft import peft_parameter_names

    lora = peft = head = trainable = backbone = 0
    peft_names = peft_parameter_names(model)
    for n, p in model.named_parameters():
        k = p.numel()
        if p.requires_grad:
            trainable += k
        if ".lora_" in n:
            lora += k
        elif n in peft_names:
            peft += k
        elif _is_head(n):
            head += k
        elif not p.requires_grad:
            backbone += k
    # Channel-pruning methods shrink the frozen backbone; the paper's % divides by the original size.
    backbone = getattr(model, "pyra_backbone_params", None) or backbone
    method_all = trainable - lora - peft - head
    method_paper = method.paper_param_count(model) if method is not None else method_all
    counted = lora + peft + method_paper
    return ParamCount(trainable, lora, head, method_all, method_paper, backbone, counted,
                      100.0 * counted / backbone if backbone else float("nan"), peft)
