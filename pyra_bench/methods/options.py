"""The built-in methods' options (``method.kwargs.*``), declared beside the methods and without torch: one
:class:`~pyra_bench.schema.Options` class per method, whose fields are its options (type, range or choices,
default, help) and whose docstring's first line describes it. The method's constructor validates its
options through it (``Method.options``); ``--help`` and ``pyra-info`` read it without importing the method
(:data:`BUILT_IN`). What needs the backbone (a block index below its depth) is checked when the model is
built.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from ..schema import Int, Items, Options, opt

Fraction = Items(float, gt=0, le=1)


class MethodOptions(Options):
    name: ClassVar[str] = "base"

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        cls.owner = f"method {cls.name!r}"


class PEFT(MethodOptions):
    """Plain PEFT: LoRA on the uncompressed backbone (the paper's "PEFT" rows; "PEFT*" on a smaller backbone)."""

    name = "peft"


class ToMe(MethodOptions):
    """ToMe + LoRA: parameter-free token merging with the paper's schedules (the strongest baseline)."""

    name = "tome"
    flops_tolerance: float = opt(0.01, "accepted |MACs fraction - budget| of a flops:<f> schedule", gt=0, lt=1)
    speedup_warmup_s: float = opt(2.0, "warm-up seconds of each timing of a speedup:<x> search", ge=0)
    speedup_duration_s: float = opt(3.0, "seconds of each timing of a speedup:<x> search", gt=0)
    speedup_cache: bool = opt(True, "reuse a speedup:<x> search's result cached for this device")


class PYRA(ToMe):
    """PYRA + LoRA: ToMe merging whose source tokens are modulated by PYRA (or one of the ablations)."""

    name = "pyra"
    variant: Any = opt("full", "the modulator: full (PYRA) or an ablation of Tables 6-8 (models.pyra.MODULATORS)")
    wr_init: Literal["uniform", "normal", "zeros"] = opt("uniform", "initialisation of W_r")
    ln_eps: float = opt(1e-5, "eps of the token-information LayerNorm", gt=0)


class EViT(MethodOptions):
    """EViT + LoRA: keep the tokens the class token attends to most, fuse the rest (Liang et al., ICLR 2022)."""

    name = "evit"
    locations: Items(Int, ge=0) | None = opt(None, "the blocks that prune; null = L//4, L//2, 3L//4")
    keep_rate: float | None = opt(None, "one keep rate at every location (overrides the budget)", gt=0, le=1)
    keep_rates: Fraction | None = opt(None, "one keep rate per block (overrides keep_rate and the budget)")
    fuse_token: bool = opt(True, "fuse the pruned tokens into one; false = drop them")
    budget_tolerance: float = opt(0.02, "warn if the MACs are further than this from the budget", ge=0)


class SPViT(MethodOptions):
    """SPViT + LoRA: learned soft token pruning with package tokens (Kong et al., ECCV 2022), PYRA protocol."""

    name = "spvit"
    selector_blocks: Items(Int, ge=0) | None = opt(None, "the blocks holding a selector; null = L/4*k-1")
    selector_hidden: float = opt(1.0, "selector width / D", gt=0)
    keep_ratios: Fraction | None = opt(None, "kept fraction of the patches per selector (overrides the budget)")
    ratio_weight: float = opt(2.0, "keep-ratio loss weight (prune stage)", ge=0)
    flops_weight: float = opt(2.0, "weight of the squared MACs-fraction error (prune stage)", ge=0)
    tau: float = opt(1.0, "Gumbel-softmax temperature", gt=0)
    budget_tolerance: float = opt(0.01, "warn if the MACs are further than this from the budget", ge=0)
    lora_epochs: float = opt(1.0, "LoRA stage length, a fraction of trainer.epochs", ge=0)
    prune_epochs: float = opt(0.5, "prune stage length, a fraction of trainer.epochs", ge=0)
    retrain_epochs: float = opt(0.5, "retrain stage length, a fraction of trainer.epochs", ge=0)


class RaP(MethodOptions):
    """RaP + LoRA: random channel pruning of a LoRA-adapted ViT (Li et al., CVPR 2022), PYRA protocol."""

    name = "rap"
    num_candidates: Int = opt(20, "random width configurations sampled on the budget", ge=1)
    eval_batches: Int = opt(4, "training batches of the fine-tuning-free proxy", ge=0)
    criterion: Literal["l1", "random"] = opt("l1", "which heads/channels a layer keeps")
    min_ratio: float = opt(0.1, "per-layer width ratios are drawn from U[min_ratio, 1]", gt=0, le=1)
    budget_tolerance: float = opt(0.01, "accepted |MACs fraction - budget|", ge=0)
    mlp_unit: Int | None = opt(None, "MLP channels pruned in groups of this size; null = auto", ge=1)
    seed: Int = opt(0, "sampling seed")
    retrain_params: Literal["lora", "lora+bias", "lora+bias+norm"] = opt("lora+bias+norm", "what trains after pruning")
    device: str = opt("auto", "where candidates are scored: auto | cpu | cuda | cuda:<index> | mps",
                      rule="auto, cpu, cuda, cuda:<index> or mps (a device this machine has)")
    max_draws: Int = opt(20000, "random draws tried to hit the budget", ge=1)
    lora_epochs: float = opt(1.0, "LoRA stage length, a fraction of trainer.epochs", ge=0)
    prune_epochs: float = opt(0.0, "prune stage length, a fraction of trainer.epochs", ge=0)
    retrain_epochs: float = opt(1.0, "retrain stage length, a fraction of trainer.epochs", ge=0)


class DiffRate(MethodOptions):
    """DiffRate + LoRA: searched per-layer prune and merge rates (Chen et al., ICCV 2023), PYRA protocol."""

    name = "diffrate"
    kept_schedule: Any = opt(None, "null = search | published:<key> | a JSON file | {prune_kept, merge_kept}")
    granularity: Int = opt(4, "step between candidate kept-patch counts", ge=1)
    search_epochs: float = opt(0.3, "search stage length, a fraction of trainer.epochs", gt=0)
    search_task: str | None = opt(None, "search on another task's train split; null = the run's task",
                                  rule="null or a task name")
    search_objective: Literal["distill", "ce"] = opt("distill", "distill (label-free) | ce (task labels)")
    flops_weight: float = opt(1542.0, "weight of (MACs fraction - budget)^2", ge=0)
    budget_tolerance: float = opt(0.02, "warn if the MACs are further than this from the budget", ge=0)


#: The built-in methods' options by method name.
BUILT_IN: dict[str, type[MethodOptions]] = {c.name: c for c in (DiffRate, EViT, PEFT, PYRA, RaP, SPViT, ToMe)}
