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
    merge = ToMeMerge(r, num_protected=1 + distill)
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
    assert model.pyra_context.num_tokens == 18 and model.pyra_context.num_protected == 2
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


# ---------------------------------------------------------------------------------------------------------
# parity with the previous implementation (tokens and sizes gathered/scattered together, x * s / s)
# ---------------------------------------------------------------------------------------------------------
def _merge_wavg_v1(x, size, m, modulator=None, distill_token=False):
    """merging.merge_wavg as it was before the lean rewrite (kept here as the parity reference)."""
    B, N, D = x.shape
    if size is None:
        size = x.new_ones(B, N, 1)
    xs = torch.cat([x * size, size], dim=-1)
    src, dst = xs[:, ::2], xs[:, 1::2]
    n_unm, r = m.unm_idx.shape[1], m.src_idx.shape[1]
    unm = src.gather(1, m.unm_idx.expand(B, n_unm, D + 1))
    s = src.gather(1, m.src_idx.expand(B, r, D + 1))
    if modulator is not None:
        t = dst.gather(1, m.dst_idx.expand(B, r, D + 1))
        s = torch.cat([modulator(s[..., :D], t[..., :D]), s[..., D:]], dim=-1)
    dst = dst.scatter_reduce(1, m.dst_idx.expand(B, r, D + 1), s, reduce="sum")
    if distill_token:
        out = torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
    else:
        out = torch.cat([unm, dst], dim=1)
    size = out[..., D:]
    return out[..., :D] / size, size


@pytest.mark.parametrize("distill", [False, True])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("modulate", [False, True])
def test_merge_matches_the_previous_implementation(distill, first, modulate):
    """Sizes and every merged token are bit-identical to the previous implementation; tokens that merge
    with nothing differ at most by the rounding of its x * s / s round trip (one float32 ulp), and are
    exactly the input tokens. The inference path (no autograd, in place) equals the autograd path."""
    from pyra_bench.models.merging import bipartite_matching, merge_wavg
    from pyra_bench.models.pyra import PYRA

    torch.manual_seed(1)
    B, N, D, r = 4, 33, 16, 9
    x = torch.randn(B, N, D)
    size = None if first else torch.randint(1, 6, (B, N, 1)).float()
    m = bipartite_matching(torch.randn(B, N, 8), r, 1 + distill)
    mod = None
    if modulate:
        mod = PYRA(r, D)
        torch.nn.init.normal_(mod.w_d)  # not the identity
    with torch.no_grad():
        old_x, old_s = _merge_wavg_v1(x, size, m, mod, distill)
        new_x, new_s = merge_wavg(x, size, m, mod, 1 + distill)
    xg, sg = merge_wavg(x.requires_grad_(), size, m, mod, 1 + distill)  # the autograd path
    assert xg.requires_grad and torch.equal(xg.detach(), new_x) and torch.equal(sg, new_s)
    assert torch.equal(new_s, old_s)
    n_unm = N - (N // 2) - r
    # output order: kept A tokens then B; with a distillation token: cls, dist, rest of A, rest of B
    kept_rows = [0] + list(range(2, n_unm + 1)) if distill else list(range(n_unm))
    dst_rows = [i for i in range(new_x.shape[1]) if i not in kept_rows]
    torch.testing.assert_close(new_x[:, kept_rows], old_x[:, kept_rows], rtol=1.2e-7, atol=0)
    assert torch.equal(new_x[:, dst_rows], old_x[:, dst_rows])
    xa = x.detach()[:, ::2]
    expect_kept = xa.gather(1, m.unm_idx.expand(B, n_unm, D))  # the kept A tokens, untouched
    assert torch.equal(new_x[:, kept_rows], expect_kept)
