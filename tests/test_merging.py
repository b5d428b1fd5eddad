"""ToMe merging: token counts, sizes, protected tokens, and a float64 re-computation of the algorithm."""

import pytest
import torch
from reference import tome_merge_one
from timm.models.deit import VisionTransformerDistilled

from pyra_bench.models import ToMeMerge, build_model, get_backbone, token_counts


def _random_inputs(B=3, N=17, D=12, H=3, hd=4, sizes=True):
    x = torch.randn(B, N, D, dtype=torch.float64)
    k = torch.randn(B, H, N, hd, dtype=torch.float64)
    size = torch.randint(1, 4, (B, N, 1)).double() if sizes else None
    return x, size, k


@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("r", [1, 3, 7])
def test_merge_matches_float64_reference(r, distill):
    x, size, k = _random_inputs()
    merge = ToMeMerge(r, class_token=True, distill_token=distill)
    out, out_size = merge(x, size, None, k)
    assert out.shape == (3, 17 - r, 12)
    for b in range(3):
        ref_x, ref_s = tome_merge_one(x[b], size[b, :, 0], k[b], r, True, distill)
        torch.testing.assert_close(out[b], ref_x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out_size[b, :, 0], ref_s, rtol=0, atol=0)


def test_first_merge_starts_with_unit_sizes_and_protects_class_token():
    x, _, k = _random_inputs(sizes=False)
    out, size = ToMeMerge(8)(x, None, None, k)
    assert out.shape[1] == 9
    torch.testing.assert_close(size.sum(dim=(1, 2)), torch.full((3,), 17.0, dtype=torch.float64))
    torch.testing.assert_close(out[:, 0], x[:, 0])  # class token untouched and first
    with pytest.raises(AssertionError):  # and the merge did change something
        torch.testing.assert_close(out[:, 1:], x[:, 1:9])


def test_r_is_clipped_inside_the_merge():
    x, size, k = _random_inputs(N=7)
    out, _ = ToMeMerge(50)(x, size, None, k)
    assert out.shape[1] == 7 - 3  # (7 - 1) // 2


def _run_and_collect(model, x):
    """Token counts and sizes after each block, read through forward hooks."""
    seen = []
    hooks = [blk.register_forward_hook(lambda m, i, o: seen.append(o)) for blk in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("schedule", ["low", "high", [5, 0, 2]])
def test_per_block_token_counts_and_sizes_follow_the_schedule(schedule):
    model = build_model("vit_tiny_test", 4, "tome", schedule).eval()
    sched = model.pyra_method.schedule
    outs = _run_and_collect(model, torch.randn(2, 3, 32, 32))
    expected = token_counts(sched, 17)[1:]
    assert [o[0].shape[1] for o in outs] == expected
    for _, size in outs:
        if size is not None:
            torch.testing.assert_close(size.sum(dim=(1, 2)), torch.full((2,), 17.0))


def test_vit_b16_high_schedule_token_counts():
    """Spec section 2 / pyra_reference 2.4: ViT-B high goes 197 -> 5 (checked on the real architecture)."""
    model = build_model("vit_b16_in21k", 10, "tome", "high").eval()
    outs = _run_and_collect(model, torch.randn(1, 3, 224, 224))
    assert [o[0].shape[1] for o in outs] == [157, 123, 93, 69, 51, 37, 27, 19, 15, 11, 8, 5]


def test_distillation_token_is_protected_in_deit():
    kwargs = dict(get_backbone("vit_tiny_test").kwargs)
    deit = VisionTransformerDistilled(num_classes=3, **kwargs)
    model = build_model(deit, 3, "pyra", [7, 2, 1]).eval()
    assert model.pyra_context.num_tokens == 18 and model.pyra_context.distill_token
    x = torch.randn(2, 3, 32, 32)
    captured = {}

    def pre_mlp(mod, inp):
        captured.setdefault("x", inp[0])

    blk = model.blocks[0]
    with torch.no_grad():
        feats = model.patch_embed(x)
        feats = model._pos_embed(feats)
        x_attn, q, k = blk.attn(blk.norm1(feats), None)
        resid = feats + x_attn
        merged, size = blk.token_reducer(resid, None, q, k)
    torch.testing.assert_close(merged[:, :2], resid[:, :2])  # class and distillation tokens first, unmerged
    assert (size[:, :2] == 1).all() and merged.shape[1] == 11
    with torch.no_grad():
        assert model(x).shape == (2, 3)
