"""EViT + LoRA: the model equals a float64 re-computation of the official EViT block, its FLOPs target holds by
torch's own FLOP counter, and bad settings are refused by name."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from pyra_bench.errors import ConfigError
from pyra_bench.models import build_model, merge_lora
from pyra_bench.models.merging import trace_sources


def _official_evit_forward(vit: VisionTransformer, x: torch.Tensor, keep: dict[int, float], fuse: bool = True):
    """youweiliang/evit's ``Attention`` + ``Block`` forward, written out over an unpatched timm ViT: full
    attention matrix, the class row averaged over heads, ``topk(sorted=True)``, the attention-weighted sum of
    the rest as one extra token."""
    t = vit.patch_embed(x)
    t = vit._pos_embed(t)
    t = vit.norm_pre(t)
    for i, blk in enumerate(vit.blocks):
        a = blk.attn
        B, N, C = t.shape
        qkv = a.qkv(blk.norm1(t)).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(dim=-1)
        out = a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        t = t + out
        if i in keep:
            left = math.ceil(keep[i] * (N - 1))
            cls_attn = attn[:, :, 0, 1:].mean(dim=1)
            _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
            non_cls = t[:, 1:]
            kept = torch.gather(non_cls, 1, idx.unsqueeze(-1).expand(-1, -1, C))
            parts = [t[:, :1], kept]
            if fuse:
                mask = torch.ones(B, N - 1, dtype=torch.bool)
                mask[torch.arange(B)[:, None], idx] = False
                compl = torch.stack([torch.nonzero(m).flatten() for m in mask])  # the official complement_idx
                non_topk = torch.gather(non_cls, 1, compl.unsqueeze(-1).expand(-1, -1, C))
                w = torch.gather(cls_attn, 1, compl)
                parts.append(torch.sum(non_topk * w.unsqueeze(-1), dim=1, keepdim=True))
            t = torch.cat(parts, dim=1)
        t = t + blk.mlp(blk.norm2(t))
    return vit.head(vit.norm(t)[:, 0])


def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5,
                             drop_path_rate=0.0)


@pytest.mark.parametrize("fuse", [True, False])
def test_model_equals_a_float64_recomputation_of_the_official_block(fuse):
    vit = _tiny_vit()
    reference = copy.deepcopy(vit).double().eval()
    model = build_model(vit, 5, "evit", "none", drop_path_rate=0.0,
                        method_kwargs={"keep_rates": [1.0, 0.7, 0.5, 0.5], "fuse_token": fuse}).double().eval()
    reference.head.load_state_dict(model.head.state_dict())  # build_model gives the model a new head
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = _official_evit_forward(reference, x, {1: 0.7, 2: 0.5, 3: 0.5}, fuse)
        got = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # 65 tokens: block 1 keeps ceil(0.7 * 64) = 45 (+ cls + fused); fused: ceil(0.5 * 46) = 23, ceil(0.5 * 24) = 12;
    # not fused: ceil(0.5 * 45) = 23, ceil(0.5 * 23) = 12
    counts = [65, 1 + 45 + fuse, 1 + 23 + fuse, 1 + 12 + fuse]
    with trace_sources(model) as trace, torch.no_grad():
        model(x)
    assert [b.tokens for b in trace.blocks] == counts
    # fused: every patch is held by a token; a patch never fused is a token of its own; the last fused token
    # (index 13) holds only fused patches. Not fused: 12 patches are left, one per kept token.
    last = trace.blocks[-1]
    for groups, fused in zip(last.groups, last.fused):
        alone = groups[~fused & (groups >= 0)]
        assert len(set(alone.tolist())) == len(alone)
        if fuse:
            assert bool((groups >= 0).all()) and bool(fused[groups == 13].all()) and int((groups == 13).sum()) > 0
        else:
            assert sorted(groups[groups >= 0].tolist()) == list(range(1, 13)) and not bool(fused.any())


def _counted_macs(model: torch.nn.Module) -> float:
    deploy = merge_lora(model).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        deploy(torch.randn(1, 3, 224, 224, device="meta"))
    return fc.get_total_flops() / 2


def test_flops_target_on_vit_b16_by_torch_flop_counter():
    with torch.device("meta"):
        full = build_model("vit_b16_in21k", 10, "peft", "none")
        model = build_model("vit_b16_in21k", 10, "evit", "flops:0.5")
    reached = _counted_macs(model) / _counted_macs(full)
    assert abs(reached - 0.5) <= 0.02, (reached, model.pyra_method.keep_rates)
    m = model.pyra_method
    assert [i for i, r in enumerate(m.keep_rates) if r < 1] == [3, 6, 9]  # EViT's drop_loc: blocks 4, 7, 10
    assert m.state()["macs_fraction"] == pytest.approx(reached, abs=0.005)


def test_official_keep_rate_at_the_official_locations():
    with torch.device("meta"):
        model = build_model("vit_b16_in21k", 10, "evit", "low", method_kwargs={"keep_rate": 0.7})
    # 196 patches: ceil(0.7*196) = 138 kept + fused; then ceil(0.7*139) = 98, ceil(0.7*99) = 70
    assert model.pyra_method.schedule == [0, 0, 0, 196 - 139, 0, 0, 139 - 99, 0, 0, 99 - 71, 0, 0]


@pytest.mark.parametrize("kwargs, compression, error, match", [
    ({"keep_rates": [0.5, 0.5]}, "low", ConfigError, r"keep_rates.*12 keep rates"),
    ({"locations": [3, 6, 12]}, "low", ConfigError, r"locations.*\[0, 12\)"),
    ({"locations": [6, 3]}, "low", ConfigError, r"locations.*increasing"),
    ({"keep_rate": 1.5}, "low", ConfigError, r"keep_rate.*\(0, 1\]"),
    ({}, "flops:0.1", ConfigError, r"below what pruning at blocks \[3, 6, 9\] can reach .*29\.5%"),
    ({}, "r8", ConfigError, r"not a FLOPs budget"),
])
def test_bad_settings_are_refused_by_name(kwargs, compression, error, match):
    with pytest.raises(error, match=match), torch.device("meta"):
        build_model("vit_b16_in21k", 10, "evit", compression, method_kwargs=kwargs)
