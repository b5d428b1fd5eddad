"""PYRA: identity at init, eqs. 4-7 against a float64 re-computation, gradients, ablation variants."""

import pytest
import torch
from reference import pyra_modulate, tome_merge_one

from pyra_bench.models import PYRA_VARIANTS, ToMeMerge, build_model, build_modulator


def _pair(seed=0):
    torch.manual_seed(seed)
    tome = build_model("vit_tiny_test", 6, "tome", "high").eval()
    pyra = build_model("vit_tiny_test", 6, "pyra", "high").eval()
    pyra.load_state_dict(tome.state_dict(), strict=False)
    return tome, pyra


def test_pyra_with_zero_wd_is_exactly_tome():
    tome, pyra = _pair()
    assert any(p.abs().sum() > 0 for n, p in pyra.named_parameters() if n.endswith("w_r"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pyra(x), tome(x))


@pytest.mark.parametrize("variant", PYRA_VARIANTS)
def test_every_variant_starts_as_identity(variant):
    tome, _ = _pair()
    model = build_model("vit_tiny_test", 6, "pyra", "high", method_kwargs={"variant": variant}).eval()
    model.load_state_dict(tome.state_dict(), strict=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), tome(x), rtol=0, atol=0)


def test_pyra_merge_matches_float64_equations():
    torch.manual_seed(1)
    B, N, D, H, hd, r = 2, 13, 10, 2, 5, 4
    mod = build_modulator("full", r, D).double()
    with torch.no_grad():
        mod.w_d.normal_(std=0.7)
        mod.norm.weight.normal_(1.0, 0.3)
        mod.norm.bias.normal_(0.0, 0.3)
    x = torch.randn(B, N, D, dtype=torch.float64)
    k = torch.randn(B, H, N, hd, dtype=torch.float64)
    size = torch.randint(1, 5, (B, N, 1)).double()
    out, out_size = ToMeMerge(r, modulator=mod)(x, size, None, k)
    w_r, w_d = mod.w_r[:, 0].tolist(), mod.w_d[0].tolist()
    ln_w, ln_b = mod.norm.weight.tolist(), mod.norm.bias.tolist()

    def modulate(S, T):
        return pyra_modulate(S, T, w_r, w_d, ln_w, ln_b, mod.norm.eps)

    for b in range(B):
        ref_x, ref_s = tome_merge_one(x[b].detach(), size[b, :, 0], k[b], r, modulate=modulate)
        torch.testing.assert_close(out[b].detach(), ref_x, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out_size[b, :, 0], ref_s)
    # non-trivial: the modulation changed the result compared to plain ToMe
    plain, _ = ToMeMerge(r)(x, size, None, k)
    assert (plain - out).abs().max() > 1e-3


def test_gradients_reach_wr_wd_and_layernorm():
    model = build_model("vit_tiny_test", 6, "pyra", "high").train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("w_d"):
                p.normal_(std=0.5)
    loss = model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    last = f"blocks.{len(model.blocks) - 1}."
    for n, p in model.named_parameters():
        if ".modulator." in n and not n.startswith(last):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif ".modulator." in n:
            # The last block's merge only touches non-class tokens after the last attention: with a
            # class-token head its modulation cannot reach the logits (true of the authors' model too).
            assert p.grad is None or p.grad.abs().sum() == 0, n
    assert model.blocks[0].attn.qkv.weight.grad is None  # frozen backbone


def test_at_init_only_wd_gets_gradient():
    """pyra_reference 3.2: with W_D = 0 the gradient w.r.t. W_r vanishes (d/dw1 is proportional to w2 = 0)."""
    model = build_model("vit_tiny_test", 6, "pyra", "high").train()
    model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean().backward()
    blk = model.blocks[0].token_reducer.modulator
    assert blk.w_d.grad.abs().sum() > 0
    assert blk.w_r.grad.abs().sum() == 0


def test_unknown_variant_lists_choices():
    with pytest.raises(KeyError, match="valid choices: .*full.*gated"):
        build_model("vit_tiny_test", 6, "pyra", "high", method_kwargs={"variant": "nope"})
