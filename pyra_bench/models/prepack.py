"""Pre-packed Linear weights for CPU inference (a deployment step, like merging LoRA into qkv).

A float32 GEMM on the CPU (MKL) first repacks its weight matrix into the kernel's blocked layout; for a
ViT-B/16 MLP weight (768 x 3072) that costs as much as the product itself at a few hundred rows. The
unmerged model's Linears run at batch x 197 rows, a merged model's later blocks at a few dozen, so the
repacking weighs on merged models most: on the 2-core Xeon VM here one thread ran 768 -> 3072 at 89
GFLOP/s (160 rows) and 75 (80 rows) against 120 and 103 with the weight packed once ahead of time
(``torch.ops.mkl._mkl_linear``, the kernel that inductor's weight freezing uses on the CPU).

:func:`prepack_linears` returns a copy of an inference model in which every ``nn.Linear`` holds its
weight packed for the row count it saw in one example forward -- schedules are static, so each layer
always sees the same row count at a fixed batch size. Another row count still gives the right output
(the kernel repacks for it). Outputs equal the unpacked model's to float32 rounding (the kernel sums in
another order). Inference only: the packed copy does not follow later changes of the weight.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def prepack_available(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> bool:
    """Whether pre-packing applies: a float32 model on the CPU with PyTorch's MKL kernels."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_linear"))


class PrepackedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is packed for MKL's GEMM at ``rows`` input rows (inference only)."""

    def __init__(self, linear: nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features, self.rows = linear.in_features, linear.out_features, int(rows)
        self.weight, self.bias = linear.weight, linear.bias
        with torch.no_grad():
            self.register_buffer("packed_weight", torch.ops.mkl._mkl_reorder_linear_weight(
                linear.weight.detach(), self.rows), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkl._mkl_linear(x, self.packed_weight, self.weight, self.bias, self.rows)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for {self.rows} rows"


@torch.inference_mode()
def prepack_linears(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` (eval, CPU, float32) with every ``nn.Linear`` pre-packed for the row count it
    sees in ``model(example)``; Linears the example forward does not reach are left as they are."""
    if not prepack_available(example.device, example.dtype):
        raise RuntimeError("pre-packed Linear weights need a float32 model on the CPU and PyTorch built with "
                           "MKL (torch.backends.mkl.is_available())")
    model = copy.deepcopy(model).eval()
    rows: dict[str, int] = {}

    def record(name):
        def hook(mod, args):
            rows.setdefault(name, args[0].numel() // max(args[0].shape[-1], 1))  # returns None: args unchanged
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if type(m) is nn.Linear]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    for name, n_rows in rows.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, PrepackedLinear(getattr(owner, leaf), n_rows))
    return model
