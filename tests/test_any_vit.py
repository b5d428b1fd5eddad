"""Any timm VisionTransformer by config (issue 25): prefix tokens (class, registers) protected as one count,
CLIP's pre-norm, DINOv2's layer scale and register tokens, average-pool heads over size-weighted tokens, and
the labelled merge variants (random split, merging before the attention).

References are independent: timm's own model (merging off) and float64 re-computations written here (a
hand-written ToMe step over the prefix count and the sizes, attention with log-size bias, the pooled head)."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from reference import tome_merge

from pyra_bench.models import build_model
from pyra_bench.models.backbones import backbone_spec_from_config
from pyra_bench.models.merging import ToMeMerge
from pyra_bench.models.vit import UnsupportedModelError, patch_vit

CONF_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf"

# The registered architectures at reduced depth (timm kwargs through the backbone config), small images
SMALL = {
    "clip_b16": dict(image_size=64, kwargs={"depth": 2}),  # 16 patches + class token, pre-norm, QuickGELU
    "dinov2_vits14_reg4": dict(image_size=56, kwargs={"depth": 2}),  # 16 patches + class + 4 registers, LayerScale
    "dinov2_gap": dict(image_size=56, kwargs={"depth": 2, "class_token": False, "global_pool": "avg"}),
}


def _spec(name, **over):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "backbone" / f"{name.replace('dinov2_gap', 'dinov2_vits14_reg4')}.yaml"))
    return backbone_spec_from_config({**cfg, **SMALL[name], **over})


def _randomize(model, seed=0):
    """Random frozen weights (LayerScale and norms included) so that every part matters; LoRA stays 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                continue
            if n.endswith("gamma") or (p.ndim == 1 and "norm" in n and n.endswith("weight")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _timm_twin(model, spec, num_classes):
    """timm's own model of ``spec`` holding ``model``'s weights (LoRA, zero, left out)."""
    ref = timm.create_model(spec.timm_name, pretrained=False, num_classes=num_classes, **spec.kwargs).eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k})
    return ref


@pytest.mark.parametrize("name", list(SMALL))
def test_unmerged_logits_equal_timms_model(name):
    spec = _spec(name)
    x = torch.randn(2, 3, spec.kwargs["img_size"], spec.kwargs["img_size"])
    for method, compression in (("peft", "none"), ("tome", [0, 0])):
        model = build_model(spec, 5, method, compression).eval()
        _randomize(model)
        ref = _timm_twin(model, spec, 5)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert model.pyra_context.num_protected == ref.num_prefix_tokens == {"clip_b16": 1}.get(name, 5 if "reg4" in name else 4)
    assert model.pyra_context.class_token == ("gap" not in name)


# ---------------------------------------------------------------------------------------------------------
# float64 re-computation: ToMe over the prefix count (reference.tome_merge), attention with log-size bias
# ---------------------------------------------------------------------------------------------------------
def _attention(blk, h, size):
    a = blk.attn
    N, D = h.shape
    qkv = F.linear(h, a.qkv.weight, a.qkv.bias).view(N, 3, a.num_heads, a.head_dim).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = q @ k.transpose(-1, -2) / math.sqrt(a.head_dim) + size.log().view(1, 1, N)
    out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(N, D)
    return F.linear(out, a.proj.weight, a.proj.bias), k


def _ls(mod, v):
    return v * mod.gamma if hasattr(mod, "gamma") else v


def _forward_reference(model, img, schedule, site="after_attention"):
    """The float64 logits of one image through ``model``'s weights with ToMe merging ``schedule``."""
    P = model.num_prefix_tokens
    pe = model.patch_embed.proj
    t = F.conv2d(img[None], pe.weight, pe.bias, stride=pe.stride).flatten(2).transpose(1, 2)[0]
    prefix = [model.cls_token[0]] if model.cls_token is not None else []
    prefix += [model.reg_token[0]] if model.reg_token is not None else []
    if model.no_embed_class:
        t = torch.cat(prefix + [t + model.pos_embed[0]])
    else:
        t = torch.cat(prefix + [t]) + model.pos_embed[0]
    if not isinstance(model.norm_pre, torch.nn.Identity):
        t = F.layer_norm(t, (t.shape[-1],), model.norm_pre.weight, model.norm_pre.bias, model.norm_pre.eps)
    size = torch.ones(t.shape[0], dtype=t.dtype)
    for blk, r in zip(model.blocks, schedule):
        if r and site == "before_attention":
            t, size = tome_merge(t, size, t, r, P)
        h, k = _attention(blk, blk.norm1(t), size)
        t = t + _ls(blk.ls1, h)
        if r and site == "after_attention":
            t, size = tome_merge(t, size, k.mean(0), r, P)
        t = t + _ls(blk.ls2, blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(blk.norm2(t)))))
    t = model.norm(t)
    if model.global_pool == "avg":  # a merged token of size s counts s times; prefix tokens excluded
        feat = (t[P:] * size[P:, None]).sum(0) / size[P:].sum()
    else:
        feat = t[0]
    return model.head(model.fc_norm(feat)), size


@pytest.mark.parametrize("name", list(SMALL))
def test_merged_logits_equal_a_float64_recomputation(name):
    spec = _spec(name)
    model = build_model(spec, 5, "tome", [5, 3]).eval()
    _randomize(model, seed=1)
    model = model.double()
    x = torch.randn(2, 3, spec.kwargs["img_size"], spec.kwargs["img_size"], dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        for b in range(2):
            ref, size = _forward_reference(model, x[b], [5, 3])
            torch.testing.assert_close(out[b], ref, rtol=1e-9, atol=1e-9)
            assert size.sum() == 16 + model.num_prefix_tokens and size[:model.num_prefix_tokens].eq(1).all()
    assert out.shape[1] == 5


def test_full_size_backbones_build_with_tome_and_pyra_at_half_the_macs():
    """The registered, full-size CLIP ViT-B/16 and DINOv2-S/14-reg4 (meta device: shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pyra_bench.models.lora import merge_lora

    for name, tokens, protected in (("clip_b16", 197, 1), ("dinov2_vits14_reg4", 261, 5)):
        for method in ("tome", "pyra"):
            with torch.device("meta"):
                model = build_model(name, 10, method, "flops:0.5")
            assert model.pyra_context.num_tokens == tokens and model.pyra_context.num_protected == protected
            assert abs(model.pyra_method.macs_fraction - 0.5) <= 0.01
    # independently counted (torch's FLOP counter) on the DINOv2-reg model: half the unmerged MACs
    def counted(method, compression):
        with torch.device("meta"):
            m = merge_lora(build_model("dinov2_vits14_reg4", 10, method, compression)).eval()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(torch.randn(1, 3, 224, 224, device="meta"))
        return fc.get_total_flops()

    assert abs(counted("pyra", "flops:0.5") / counted("peft", "none") - 0.5) <= 0.02


def test_unsupported_structures_are_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="global_pool='max' is not supported.*supported: token, avg"):
        patch_vit(timm.models.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                                class_token=False, global_pool="max"))


# ---------------------------------------------------------------------------------------------------------
# merge variants
# ---------------------------------------------------------------------------------------------------------
def test_random_split_is_a_random_partition_of_the_non_prefix_tokens_in_training_only():
    torch.manual_seed(0)
    B, N, D, P, r = 3, 21, 8, 5, 4
    x, k = torch.randn(B, N, D, dtype=torch.float64), torch.randn(B, 2, N, 4, dtype=torch.float64)
    size = torch.randint(1, 4, (B, N, 1)).double()
    merge = ToMeMerge(r, P, split="random")
    alternate = ToMeMerge(r, P)
    merge.eval()
    assert torch.equal(merge(x, size, None, k)[0], alternate(x, size, None, k)[0])  # eval: the alternate split
    merge.train()
    torch.manual_seed(7)
    out, out_size = merge(x, size, None, k)
    torch.manual_seed(7)  # the partition: a uniformly random order of the non-prefix tokens, per image
    perm = torch.cat([torch.arange(P).expand(B, P), torch.rand(B, N - P).argsort(1) + P], 1)
    for b in range(B):
        p = perm[b]
        ref_x, ref_s = tome_merge(x[b, p], size[b, p, 0], k[b, :, p].mean(0), r, P)
        torch.testing.assert_close(out[b], ref_x, rtol=1e-12, atol=1e-12)
        assert torch.equal(out_size[b, :, 0], ref_s)
    torch.testing.assert_close(out[:, :P], x[:, :P], rtol=1e-14, atol=0)  # prefix tokens first, unmerged (B ones: x*s/s)
    # over draws, every non-prefix token is sometimes in A (a source candidate) and sometimes in B
    in_a = torch.zeros(N - P)
    for _ in range(30):
        in_a[torch.rand(N - P).argsort()[::2]] += 1
    assert (in_a > 0).all() and (in_a < 30).all()


@pytest.mark.parametrize("split", ["alternate", "random"])
def test_source_trace_follows_prefix_tokens_and_the_random_split(split):
    """With 5 prefix tokens (class + 4 registers) and either split, two merges in a row: each traced group's
    patches average (by input token) to the merged token, and their count is the merge's own size."""
    from pyra_bench.models.merging import SourceTrace

    torch.manual_seed(2)
    B, N, P = 2, 21, 5
    x0 = torch.randn(B, N, 6, dtype=torch.float64)
    trace = SourceTrace(num_prefix=P)
    trace.start(x0)
    x, size = x0, None
    for r in (4, 3):
        red = ToMeMerge(r, P, split=split).train()
        red.trace = trace
        x, size = red(x, size, None, torch.randn(B, 2, x.shape[1], 4, dtype=torch.float64))
        trace.end_block(x.shape[1])
    groups = trace.blocks[-1].groups  # (B, 16 patches): the token holding each
    assert x.shape[1] == N - 7 and (groups >= P).all()
    for b in range(B):
        torch.testing.assert_close(x[b, :P], x0[b, :P], rtol=1e-14, atol=0)
        for t in range(P, x.shape[1]):
            held = (groups[b] == t).nonzero()[:, 0] + P
            assert len(held) == size[b, t, 0]
            torch.testing.assert_close(x[b, t], x0[b, held].mean(0), rtol=1e-12, atol=1e-12)


def test_merge_before_attention_hand_worked_example():
    """5 tokens (class + 4 patches), r = 1 in block 0: A = {0, 2, 4}, B = {1, 3}. Token 2 is made equal to
    token 3 (cosine 1), so before the attention token 2 merges into 3 (one token of size 2, equal to both);
    the attention and MLP then run on [t0, t4, t1, t3] with sizes [1, 1, 1, 2]."""
    vit = timm.models.VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2,
                                        num_classes=3, qkv_bias=True).double().eval()
    model = build_model(vit, 3, "tome", [1], merge_site="before_attention").double().eval()
    blk = model.blocks[0]
    assert blk.merge_before_attention and "before_attention" in blk.token_reducer.sites
    torch.manual_seed(3)
    t = torch.randn(1, 5, 8, dtype=torch.float64)
    t[0, 1] = -t[0, 3]  # keep every other pair clearly dissimilar from token 3's partner choice
    t[0, 2] = t[0, 3]
    with torch.no_grad():
        out, size = blk(t, None)
    assert size[0, :, 0].tolist() == [1, 1, 1, 2]
    merged = t[0, [0, 4, 1, 3]]
    s = torch.tensor([1.0, 1, 1, 2], dtype=torch.float64)
    h, _ = _attention(blk, blk.norm1(merged), s)
    h = merged + h
    expect = h + blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(blk.norm2(h))))
    torch.testing.assert_close(out[0], expect, rtol=1e-12, atol=1e-12)
    # the whole model against the float64 re-computation, and the MACs: the attention runs on 4 tokens
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
    for b in range(2):
        torch.testing.assert_close(logits[b], _forward_reference(model, x[b], [1], "before_attention")[0],
                                   rtol=1e-9, atol=1e-9)
    g = model.pyra_context.geometry
    after = g.macs([1]) - g.macs([0])
    assert g.merge_before_attention and after < 0
    attn_5, attn_4 = (n * 8 * 3 * 8 + 2 * n * n * 8 + n * 8 * 8 for n in (5, 4))
    assert g.macs([0]) - g.macs([1]) == (attn_5 - attn_4) + 2 * (5 - 4) * 8 * 32  # hand count


def test_merge_variants_need_a_bipartite_merging_method_and_valid_values():
    from pyra_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="method 'peft' does not merge.*methods that take them: .*tome"):
        build_model("vit_tiny_test", 3, "peft", "none", merge_split="random")
    with pytest.raises(ConfigError, match="unknown backbone.merge_site 'inside'; valid choices: after_attention, "
                                          "before_attention"):
        build_model("vit_tiny_test", 3, "tome", "r2", merge_site="inside")


def test_run_id_names_a_merge_variant_only_when_not_the_default():
    from pyra_bench.identity import run_id

    base = OmegaConf.create({"task": {"name": "digits"}, "backbone": {"name": "vit_tiny_test"},
                             "method": {"name": "tome"}, "compression": "r2", "seed": 0})
    plain = run_id(base)
    assert plain == "digits__vit_tiny_test__tome__r2__seed0"
    same = OmegaConf.merge(base, {"backbone": {"merge_split": "alternate", "merge_site": "after_attention"}})
    assert run_id(same) == plain
    other = OmegaConf.merge(base, {"backbone": {"merge_split": "random", "merge_site": "before_attention"}})
    assert run_id(other) == "digits__vit_tiny_test-merge_split=random-merge_site=before_attention__tome__r2__seed0"


def test_tables_give_a_merge_variant_rows_of_its_own():
    from pyra_bench.tables import record_key

    rec = {"backbone": "vit_tiny_test", "method": "tome", "schedule": "r2", "method_options": {}}
    assert record_key({**rec, "settings": {"backbone.merge_split": "alternate"}})["run_tag"] == ""
    assert record_key(rec)["run_tag"] == ""  # an older record (no such setting): the defaults
    both = {"backbone.merge_split": "random", "backbone.merge_site": "before_attention"}
    assert record_key({**rec, "run_tag": "lr1", "settings": both})["run_tag"] == (
        "lr1+merge_split=random+merge_site=before_attention")


def test_dinov2_reg4_trains_on_the_embedded_data_with_the_random_split(tmp_path):
    """One in-process run: DINOv2-S/14-reg4 reduced to 2 blocks at 56 px (for speed), PYRA at flops:0.7
    (21 tokens in 2 blocks cannot merge down to 0.5; the full-size model at 0.5 is built above)."""
    import json

    from hydra import compose, initialize_config_dir

    from pyra_bench.train import train

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "backbone=dinov2_vits14_reg4", "backbone.weights=none", "backbone.image_size=56",
            "+backbone.kwargs.depth=2", "backbone.merge_split=random", "task=digits", "method=pyra",
            "compression=flops:0.7", "trainer=smoke", "trainer.epochs=1", "trainer.warmup_epochs=0",
            f"results_dir={tmp_path}/results", f"run_dir={tmp_path}/run"])
    train(cfg)
    (path,) = (tmp_path / "results").glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "completed" and record["backbone"] == "dinov2_vits14_reg4"
    assert record["backbone_label"] == "DINOv2-reg ViT-S/14"
    assert "dinov2_vits14_reg4-merge_split=random__pyra" in path.name
    assert abs(record["method_state"]["macs_fraction"] - 0.7) <= 0.01
