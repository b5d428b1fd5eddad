"""The reproduction knobs as configs (issue 14), unit-level, no training: proportional attention on/off
(``backbone.prop_attn``), the authors' per-task PYRA learning rates (``+recipe=pyra_authors_lr``) and their
evaluation epochs (``trainer=paper_authors_eval``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

import pyra_bench.train  # noqa: F401  (registers the config resolvers)
from pyra_bench import factory, pipeline
from pyra_bench.lit import AdaptationModule, ScheduledEvaluation
from pyra_bench.paths import CONF_DIR


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=["backbone=vit_tiny_test", "task=cifar100", *overrides])


def _model(cfg):
    torch.manual_seed(0)
    return factory.make_model(cfg, 100, pretrained=False, checkpoint=None).eval()


@pytest.mark.parametrize("compression", ["high", "none"])
def test_prop_attn_false_changes_the_output_only_after_a_merge(compression):
    on = _model(_cfg("method=tome", f"compression={compression}"))
    off = _model(_cfg("method=tome", f"compression={compression}", "backbone.prop_attn=false"))
    assert all(b.attn.prop_attn for b in on.blocks) and not any(b.attn.prop_attn for b in off.blocks)
    off.load_state_dict(on.state_dict())  # the same weights: the key is the only difference
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_on, y_off = on(x), off(x)
    if compression == "none":  # every token of size 1: log(1) = 0, nothing to weight
        torch.testing.assert_close(y_off, y_on)
        return
    assert (y_off - y_on).abs().max() > 1e-3  # merged tokens of size > 1: the softmax differs
    for b in on.blocks:  # and it is exactly the attention's flag that does it
        b.attn.prop_attn = False
    with torch.no_grad():
        torch.testing.assert_close(on(x), y_off)


def _optimizer(cfg):
    model = _model(cfg)
    module = AdaptationModule(model, 100, pipeline._optim(cfg), epochs=int(cfg.trainer.epochs))
    opt = module.configure_optimizers()["optimizer"]
    return model, {g["name"]: g for g in opt.param_groups}


def test_the_authors_pyra_lr_of_the_task_reaches_the_optimizer():
    # research note pyra_reference.md section 5.3: cifar100 at "high", 3e-6 (conf/task/cifar100.yaml pyra_lr)
    model, groups = _optimizer(_cfg("method=pyra", "compression=high", "+recipe=pyra_authors_lr"))
    pyra_params = {id(p) for p in model.pyra_method.method_parameters(model).values() if p.requires_grad}
    assert pyra_params  # W_r, W_D and the token LayerNorm
    in_method_groups = {id(p) for name in ("method", "method_no_decay") for p in groups[name]["params"]}
    assert in_method_groups == pyra_params
    assert groups["method"]["initial_lr"] == 3e-6 and groups["method"]["weight_decay"] == 1e-3
    assert groups["method_no_decay"]["initial_lr"] == 3e-6 and groups["method_no_decay"]["weight_decay"] == 0.0
    # LoRA and the head keep the recipe's lr and weight decay
    lora = {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert lora and lora <= {id(p) for p in groups["decay"]["params"]}
    assert groups["decay"]["initial_lr"] == 1e-3 and groups["decay"]["weight_decay"] == 1e-4
    # without the recipe PYRA's parameters train with everything else, at trainer.lr
    _, plain = _optimizer(_cfg("method=pyra", "compression=high"))
    assert set(plain) == {"decay", "no_decay"} and {g["initial_lr"] for g in plain.values()} == {1e-3}


def _evaluated_epochs(cfg) -> list[int]:
    """The epochs at which the run's (single-stage) module evaluates: its schedule as the pipeline gives it,
    run through the ScheduledEvaluation callback for every epoch (the evaluation itself stubbed)."""
    epochs = int(cfg.trainer.epochs)
    module = AdaptationModule(_model(cfg), 100, pipeline._optim(cfg), epochs=epochs,
                              eval_epochs=pipeline.eval_epochs(cfg.trainer, 0, epochs, is_last=True))
    module.evaluate, module.log = (lambda: 50.0), (lambda *a, **k: None)
    trainer = SimpleNamespace(current_epoch=0)
    module._trainer = trainer
    callback = ScheduledEvaluation()
    for e in range(epochs):
        trainer.current_epoch = e
        callback.on_train_epoch_end(trainer, module)
    return sorted(module.eval_history)


def test_the_authors_evaluation_epochs():
    assert _evaluated_epochs(_cfg("method=pyra", "compression=high", "trainer=paper_authors_eval")) == \
        [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100]
    # the paper's recipe evaluates every 10 epochs instead
    assert _evaluated_epochs(_cfg("method=pyra", "compression=high", "trainer=paper")) == \
        [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
