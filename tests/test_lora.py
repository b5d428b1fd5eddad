"""LoRA on qkv: equality with timm's own model, merge/unmerge, a float64 hand computation of the LoRA forward, and
HF peft as an independent oracle where it is installed (``pip install -e ".[dev,oracle]"``)."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from pyra_bench.errors import ConfigError
from pyra_bench.models import build_model, create_backbone, get_backbone, merge_lora
from pyra_bench.models.lora import LoRALinear, lora_modules


def _reference_and_adapted(backbone, num_classes, method="peft", schedule=None, img=32):
    ref = create_backbone(backbone, num_classes).eval()
    model = build_model(backbone, num_classes, method, schedule, lora_init="standard").eval()
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert not unexpected and all(".lora_" in k or "token_reducer" in k for k in missing)
    return ref, model


@pytest.mark.parametrize("method", ["peft", "tome", "pyra"])
def test_zero_schedule_fresh_lora_equals_timm_tiny(method):
    ref, model = _reference_and_adapted("vit_tiny_test", 7, method, "none" if method != "peft" else None)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_zero_schedule_fresh_lora_equals_timm_vit_b16():
    ref, model = _reference_and_adapted("vit_b16_in21k", 100, "pyra", "none")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def _randomise_lora(model):
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_a.weight, std=0.2)
        torch.nn.init.normal_(m.lora_b.weight, std=0.2)


@pytest.mark.parametrize("method,schedule", [("peft", None), ("pyra", "high")])
def test_merged_equals_unmerged(method, schedule):
    model = build_model("vit_tiny_test", 5, method, schedule).eval()
    _randomise_lora(model)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        merged = merge_lora(model)
        y_merged = merged(x)
    rel = (y_merged - y).norm() / y.norm()
    assert rel < 1e-5
    assert not lora_modules(merged) and lora_modules(model), "merge_lora must copy by default"
    # in-place merge / unmerge round trip
    with torch.no_grad():
        w0 = model.blocks[0].attn.qkv.weight.clone()
        for m in lora_modules(model):
            m.merge()
        assert (model(x) - y).norm() / y.norm() < 1e-5
        for m in lora_modules(model):
            m.unmerge()
        torch.testing.assert_close(model.blocks[0].attn.qkv.weight, w0, rtol=0, atol=1e-6)


def test_merged_model_has_plain_timm_parameter_set():
    model = build_model("vit_tiny_test", 5, "peft")
    merged = merge_lora(model)
    plain = create_backbone("vit_tiny_test", 5)
    assert set(merged.state_dict()) == set(plain.state_dict())
    assert all(type(b.attn.qkv) is torch.nn.Linear for b in merged.blocks)


def test_only_lora_head_and_method_parameters_train():
    model = build_model("vit_tiny_test", 5, "pyra", "low")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "something must train"
    for n in trainable:
        assert ".lora_" in n or n.startswith("head.") or ".token_reducer.modulator." in n, n
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "blocks.0.attn.qkv.weight" in frozen and "cls_token" in frozen and "pos_embed" in frozen


def test_lora_init_options():
    std = LoRALinear(8, 24, 4, init="standard")
    assert torch.count_nonzero(std.lora_b.weight) == 0 and std.lora_a.weight.abs().max() > 0
    auth = LoRALinear(256, 768, 8, init="authors")
    assert torch.count_nonzero(auth.lora_b.weight) > 0
    # timm/torch trunc_normal_(std=0.02) cuts at +-2 *absolute*, i.e. effectively a plain N(0, 0.02^2)
    assert abs(auth.lora_b.weight.std().item() - 0.02) < 0.001
    with pytest.raises(ConfigError, match="valid choices"):  # an InputError that is still a ValueError
        LoRALinear(8, 24, 4, init="bogus")


def test_lora_forward_equals_a_float64_hand_computation():
    """Every block's qkv is ``x W^T + b + (alpha / r) (x A^T) B^T`` (LoRA, Hu et al. eq. 3, scale alpha / r):
    the adapted model's forward, recomputed in float64 through timm's own unpatched blocks with each qkv
    weight replaced by ``W + (alpha / r) B A``; and merging folds exactly that weight."""
    kwargs = get_backbone("vit_tiny_test").kwargs
    base = VisionTransformer(num_classes=5, **kwargs).eval()
    ours = build_model("vit_tiny_test", 5, "peft", lora_rank=2, lora_alpha=4.0, lora_dropout=0.0).eval()
    ours.load_state_dict(base.state_dict(), strict=False)
    _randomise_lora(ours)
    ref = base.double()
    ref.head.load_state_dict(ours.head.state_dict())
    with torch.no_grad():
        for blk, mine in zip(ref.blocks, ours.blocks):
            a, b = mine.attn.qkv.lora_a.weight.double(), mine.attn.qkv.lora_b.weight.double()
            assert a.shape == (2, 48) and b.shape == (144, 2)  # rank 2 on a 48-wide qkv
            blk.attn.qkv.weight += (4.0 / 2) * (b @ a)
        x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(ours.double()(x), ref(x), rtol=0, atol=1e-10)
        merged = merge_lora(ours)  # folds B @ A in float32 (the low-precision test below), then rounds once
        for blk, m in zip(ref.blocks, merged.blocks):
            torch.testing.assert_close(m.attn.qkv.weight, blk.attn.qkv.weight, rtol=0, atol=1e-6)


def test_lora_matches_hf_peft_oracle():
    peft = pytest.importorskip("peft")
    kwargs = get_backbone("vit_tiny_test").kwargs
    base = VisionTransformer(num_classes=5, **kwargs).eval()
    ours = build_model("vit_tiny_test", 5, "peft", lora_dropout=0.0).eval()
    ours.load_state_dict(base.state_dict(), strict=False)
    _randomise_lora(ours)
    cfg = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["qkv"], lora_dropout=0.0)
    host = VisionTransformer(num_classes=5, **kwargs)
    host.load_state_dict(base.state_dict())
    theirs = peft.get_peft_model(host, cfg).eval()
    with torch.no_grad():
        for i, blk in enumerate(theirs.base_model.model.blocks):
            ob = ours.blocks[i].attn.qkv
            blk.attn.qkv.lora_A["default"].weight.copy_(ob.lora_a.weight)
            blk.attn.qkv.lora_B["default"].weight.copy_(ob.lora_b.weight)
        x = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        merged_theirs = theirs.merge_and_unload()
        merged_ours = merge_lora(ours)
        for i in range(len(merged_ours.blocks)):
            torch.testing.assert_close(merged_ours.blocks[i].attn.qkv.weight,
                                       merged_theirs.blocks[i].attn.qkv.weight, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_merge_folds_in_float32(dtype):
    """A bf16/fp16 model merges as W + scale*B@A computed in float32 and rounded once (float64 reference);
    rounding the product first, as a naive half-precision fold does, is measurably worse."""
    torch.manual_seed(0)
    model = build_model("vit_tiny_test", 5, "peft", lora_init="authors").to(dtype)
    for m in lora_modules(model):
        torch.nn.init.normal_(m.lora_a.weight, std=0.3)
        torch.nn.init.normal_(m.lora_b.weight, std=0.3)
    merged = merge_lora(model)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            ref = (m.weight.double() + m.scale * (m.lora_b.weight.double() @ m.lora_a.weight.double())).to(dtype)
            got = merged.get_submodule(name).weight
            assert got.dtype == dtype
            # equal to the correctly rounded float64 result up to one rounding step of the float32 sum
            torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                                       atol=0)
            naive = m.weight + (m.lora_b.weight @ m.lora_a.weight) * m.scale  # all in low precision
            assert (got.float() - ref.float()).abs().mean() < (naive.float() - ref.float()).abs().mean()
