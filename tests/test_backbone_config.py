"""Backbones from config: any timm ViT by name, registered ones overridden, unsupported ones refused by name."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from pyra_bench.errors import ConfigError
from pyra_bench.models import (
    BACKBONES,
    UnsupportedModelError,
    backbone_spec_from_config,
    build_model,
    get_backbone,
    merge_lora,
    patch_vit,
)
from pyra_bench.paths import CONF_DIR
from pyra_bench.registry import UnknownChoiceError


def test_every_backbone_config_resolves_and_carries_a_display_name_and_prop_attn():
    for path in sorted((CONF_DIR / "backbone").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        cfg.weights = "none"  # interpolations of the weights folder need the run's config
        spec = backbone_spec_from_config(cfg)
        assert spec.name == cfg.name == path.stem
        assert spec.display_name and spec.label == spec.display_name, path
        assert cfg.prop_attn is True, path
        assert spec.kwargs["img_size"] == cfg.image_size
    assert {n: get_backbone(n).label for n in ("vit_b16_in21k", "vit_l16_in21k", "deit_b16_distilled")} == {
        "vit_b16_in21k": "ViT-B/16", "vit_l16_in21k": "ViT-L/16", "deit_b16_distilled": "DeiT-B"}
    assert all(get_backbone(n).display_name for n in BACKBONES.names())


def test_registered_name_is_overridden_by_given_fields():
    spec = backbone_spec_from_config({"name": "vit_b16_in21k", "lora_rank": 4, "display_name": "B16",
                                      "schedule_family": "none", "image_size": 384, "weights": "hub"})
    base = get_backbone("vit_b16_in21k")
    assert (spec.lora_rank, spec.label, spec.schedule_family) == (4, "B16", None)
    assert spec.timm_name == base.timm_name and spec.kwargs["img_size"] == 384
    same = backbone_spec_from_config({"name": "vit_b16_in21k", "lora_rank": None, "image_size": None})
    assert same == base  # null = keep the registered value


def test_config_errors_name_the_value_and_the_choices():
    with pytest.raises(UnknownChoiceError, match="unknown backbone .my_vit.; valid choices: .*timm_name=.*vit_b16_in21k"):
        backbone_spec_from_config({"name": "my_vit"})
    with pytest.raises(ConfigError, match="give its lora_rank"):
        backbone_spec_from_config({"name": "my_vit", "timm_name": "vit_small_patch16_224"})
    with pytest.raises(ConfigError, match="timm has no model 'vit_nonexistent_patch3'"):
        backbone_spec_from_config({"name": "x", "timm_name": "vit_nonexistent_patch3", "lora_rank": 4})
    with pytest.raises(ConfigError, match="unknown backbone config key.*lora_rnak"):
        backbone_spec_from_config({"name": "vit_b16_in21k", "lora_rnak": 4})
    with pytest.raises(ConfigError, match="lora_rank must be a positive int"):
        backbone_spec_from_config({"name": "vit_b16_in21k", "lora_rank": 0})
    with pytest.raises(UnknownChoiceError, match="valid choices: .*vit_b"):
        backbone_spec_from_config({"name": "vit_b16_in21k", "schedule_family": "vit_q"})


@pytest.mark.parametrize("timm_name,reason", [
    ("vit_small_patch16_18x2_224", "block 0 is a ParallelThingsBlock; only timm's plain Block"),
    ("vit_base_patch16_siglip_224", "global_pool='map' is not supported"),
    ("resnet18", "cannot be built as a timm VisionTransformer"),
])
def test_unsupported_timm_models_are_refused_by_name(timm_name, reason):
    spec = backbone_spec_from_config({"name": "candidate", "timm_name": timm_name, "lora_rank": 4,
                                      "image_size": 64 if "patch14" not in timm_name else 56})
    with pytest.raises(UnsupportedModelError, match=rf"backbone 'candidate' \(timm {timm_name}\).*{reason}"):
        with torch.device("meta"):
            build_model(spec, 10, "tome", "none")


def _dinov2_config(**over):
    cfg = OmegaConf.load(CONF_DIR / "backbone" / "dinov2_vits14.yaml")
    return OmegaConf.merge(cfg, over)


def test_the_vit_patch_computes_dinov2_exactly():
    """DINOv2 blocks carry LayerScale: the patched model (no merging) equals timm's own forward."""
    spec = backbone_spec_from_config(_dinov2_config(weights="none", image_size=56))
    ref = timm.create_model(spec.timm_name, pretrained=False, num_classes=3, img_size=56).eval()
    assert type(ref.blocks[0].ls1).__name__ == "LayerScale"
    with torch.no_grad():  # LayerScale starts at 1e-5: make it matter
        for blk in ref.blocks:
            blk.ls1.gamma.fill_(0.5), blk.ls2.gamma.fill_(0.7)
    patched = patch_vit(copy.deepcopy(ref))
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(patched(x), ref(x), rtol=1e-5, atol=1e-5)


def test_dinov2_config_with_pyra_at_half_the_macs_trains():
    cfg = _dinov2_config(weights="none", image_size=56)
    spec = backbone_spec_from_config(cfg)
    assert spec.label == "DINOv2 ViT-S/14" and spec.lora_rank == 4 and spec.schedule_family is None
    model = build_model(spec, 10, "pyra", "flops:0.5", prop_attn=cfg.prop_attn)
    assert model.pyra_context.num_tokens == 17  # (56 / 14)^2 patches + class token
    # torch's FLOP counter on the deployable model (on the meta device, where it sees the attention
    # matmuls too): half the unmerged model's MACs, within 0.02
    def counted(method, compression):
        with torch.device("meta"):
            m = merge_lora(build_model(spec, 10, method, compression)).eval()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(torch.randn(1, 3, 56, 56, device="meta"))
        return fc.get_total_flops()

    assert abs(counted("pyra", "flops:0.5") / counted("peft", "none") - 0.5) <= 0.02
    # one training step: gradients reach LoRA and PYRA's parameters, nothing frozen moves
    x, y = torch.randn(4, 3, 56, 56), torch.randint(0, 10, (4,))
    frozen = model.blocks[0].mlp.fc1.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert model.blocks[0].attn.qkv.lora_b.weight.grad.abs().sum() > 0  # (B = 0 at init: A gets none yet)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if ".modulator." in n)
    opt.step()
    assert torch.equal(model.blocks[0].mlp.fc1.weight, frozen) and torch.isfinite(loss)


# (the in-process training run of a config-defined DINOv2 backbone: tests/test_any_vit.py, with registers)
