"""SPViT + LoRA: selectors, package tokens, batched deterministic top-k, budget, stages, resume, counts."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from reference import tokens_leaving_blocks

from pyra_bench.methods.spvit import EPS, BudgetError, SPViTSelector, TokenSelector, default_selector_blocks
from pyra_bench.models import build_model, count_parameters, merge_lora
from pyra_bench.models.macs import model_macs

NC = 5
# On the 48-wide tiny backbone the D-wide selectors cost ~6 % of the MACs, so "low" (50 %) leaves one token per
# selector (a valid but degenerate model: tested once); most tests use a 70 % budget (keeps 8/4/2 of 16 patches).
BUDGET = "flops:0.7"



def _build(schedule=BUDGET, **kw):
    return build_model("vit_tiny_test", NC, "spvit", schedule, method_kwargs=kw)


def _stage(method, name):
    return next(s for s in method.stages() if s.name == name)


def _train_stage(model, stage_name, steps=3, seed=0):
    """A minimal manual loop: on_stage_start, AdamW over what requires grad, CE + extra_loss."""
    method = model.pyra_method
    method.on_stage_start(_stage(method, stage_name), model, None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    extras = []
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, NC, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        extra = method.extra_loss(model)
        extras.append(extra)
        if extra is not None:
            loss = loss + extra
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        opt.step()
    model.eval()
    return extras


def _selector_macs(infer):
    n, extra = 1 + infer.patch_embed.num_patches, 0
    for blk in infer.blocks:
        if blk.token_reducer is not None:
            extra += blk.token_reducer.extra_macs(n)
            n = blk.token_reducer.tokens_out(n)
    return extra


def _total_macs(infer):
    """Analytic MACs of the inference model: model_macs counts the backbone and the selectors' matmuls."""
    return model_macs(infer)


def _backbone_macs(infer):
    return model_macs(infer) - _selector_macs(infer)



def test_default_selector_blocks():
    assert default_selector_blocks(12) == [2, 5, 8]
    assert default_selector_blocks(24) == [5, 11, 17]
    assert default_selector_blocks(3) == [0, 1, 2]


@pytest.mark.parametrize("budget,target", [(BUDGET, 0.70), ("low", 0.50)])
def test_three_stages_end_to_end_budget_and_token_counts(budget, target):
    if budget == "low":
        with pytest.warns(UserWarning, match="reachable floor"):
            model = _build(budget)
    else:
        model = _build(budget)
    m = model.pyra_method
    assert [s.name for s in m.stages()] == ["lora", "prune", "retrain"]
    # stage 1: LoRA + head only, no selectors, no extra loss
    assert _train_stage(model, "lora") == [None] * 3
    assert all(b.token_reducer is None for b in model.blocks)
    assert m.paper_param_count(model) == 0
    # stage 2: selectors inserted, trainable, gumbel + budget loss
    lora_b = model.blocks[0].attn.qkv.lora_b.weight.detach().clone()
    extras = _train_stage(model, "prune")
    assert len(m.selectors(model)) == 3 and all(e is not None and torch.isfinite(e) for e in extras)
    assert not torch.equal(model.blocks[0].attn.qkv.lora_b.weight, lora_b)  # LoRA trains with the selectors
    # stage 3: hard top-k, no budget loss, selectors still train (through the package weights)
    w0 = m.selectors(model)[0].selector.in_conv[1].weight.detach().clone()
    assert _train_stage(model, "retrain") == [None] * 3
    assert not torch.equal(m.selectors(model)[0].selector.in_conv[1].weight, w0)

    # FLOPs: the inference model's analytic MACs are the budget (token granularity)
    infer = m.inference_model(model)
    full = model_macs(build_model("vit_tiny_test", NC, "peft"))
    assert m.full_macs == full
    assert abs(_total_macs(infer) / full - target) <= 0.01
    assert _total_macs(infer) / full == pytest.approx(m.macs_fraction)
    assert _backbone_macs(infer) / full == pytest.approx(m.state()["backbone_macs_fraction"])
    assert _selector_macs(infer) == m.selector_macs() > 0
    # tokens actually leaving each block (eval, batched) = prefix + kept + packages
    keep = m.keep
    assert tokens_leaving_blocks(infer, torch.randn(4, 3, 32, 32)) == [1 + keep[0] + 1, 1 + keep[1] + 2, 1 + keep[2] + 3]
    red = [b.token_reducer for b in infer.blocks]
    assert [r.tokens_out(n) for r, n in zip(red, [17, 1 + keep[0] + 1, 1 + keep[1] + 2])] == [
        1 + keep[0] + 1, 1 + keep[1] + 2, 1 + keep[2] + 3]


def test_inference_is_deterministic_and_batch_independent():
    model = _build()
    _train_stage(model, "lora", steps=1)
    _train_stage(model, "prune", steps=2)
    infer = model.pyra_method.inference_model(model)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        a, b = infer(x), infer(x)
        single = torch.cat([infer(x[i:i + 1]) for i in range(6)])
        # the LoRA-merged copy computes what the trained model computes in eval mode
        model.eval()
        c = model(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(single, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-5)


def test_keep_all_reproduces_the_unpruned_model():
    model = _build("none", keep_ratios=[1.0, 1.0, 1.0])  # explicit keep ratios, no budget
    m = model.pyra_method
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        m.on_stage_start(_stage(m, "retrain"), model)
        model.eval()
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # empty packages are masked (size EPS)


def test_hard_selector_package_token_and_batched_topk():
    torch.manual_seed(1)
    sel = SPViTSelector(dim=8, hidden=8, index=0, keep=3, num_prefix=1).eval()
    x = torch.randn(4, 1 + 7, 8)
    with torch.no_grad():
        out, size = sel(x, None)
        lp = sel.selector(x[:, 1:], None)[..., 0]
    assert out.shape == (4, 1 + 3 + 1, 8) and size.shape == (4, 5, 1)
    for i in range(4):
        order = lp[i].argsort(descending=True)
        kept, dropped = order[:3].sort().values, order[3:]
        torch.testing.assert_close(out[i, 0], x[i, 0])
        torch.testing.assert_close(out[i, 1:4], x[i, 1 + kept])
        w = torch.softmax(lp[i, dropped], 0)  # keep-probability weights over the dropped tokens
        torch.testing.assert_close(out[i, 4], (w[:, None] * x[i, 1 + dropped]).sum(0))
        assert size[i, :4].eq(1).all() and size[i, 4, 0] == 4  # the package stands for 4 tokens
        with torch.no_grad():  # per-image == batched
            o1, _ = sel(x[i:i + 1], None)
        torch.testing.assert_close(o1[0], out[i])


def test_soft_selector_gumbel_masks_and_packages():
    torch.manual_seed(0)
    sel = SPViTSelector(dim=8, hidden=8, index=1, keep=3, num_prefix=1).train()
    x = torch.randn(2, 1 + 6 + 1, 8, requires_grad=True)
    prev = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]], dtype=torch.float32)
    size = torch.cat([torch.ones(2, 1), EPS + (1 - EPS) * prev, torch.full((2, 1), 2.0)], 1)[..., None]
    out, s = sel(x, size)
    assert out.shape == (2, 9, 8) and s.shape == (2, 9, 1)
    pol = ((s[:, 1:7, 0] - EPS) / (1 - EPS))
    assert torch.allclose(pol, pol.round(), atol=1e-5)  # hard 0/1 decisions
    assert (pol.round() <= prev).all()  # dropped stays dropped
    newly = prev - pol.round()
    torch.testing.assert_close(s[:, 8, 0], EPS + newly.sum(1))  # package size = tokens it folds
    assert s[:, 7, 0].eq(2.0).all() and s[:, 0, 0].eq(1.0).all()
    torch.testing.assert_close(sel.last_kept, pol.round().sum(1))
    (out.sum() + sel.last_kept.sum()).backward()  # straight-through gradients reach the selector
    assert sel.selector.in_conv[1].weight.grad.abs().sum() > 0


def test_budget_loss_vanishes_at_the_target():
    model = _build()
    m = model.pyra_method
    m.on_stage_start(_stage(m, "prune"), model)
    for s in m.selectors(model):
        s.last_kept = torch.full((4,), float(s.keep))
    assert m.extra_loss(model).item() == pytest.approx(0.0, abs=1e-12)
    for s in m.selectors(model):
        s.last_kept = torch.full((4,), float(s.keep + 2))
    assert m.extra_loss(model).item() > 0


def test_budget_below_the_floor_is_refused():
    with pytest.raises(BudgetError, match="floor"):
        _build("high")  # tiny backbone, selectors at 0/1/2: floor 49.4 % of the MACs (selectors included)
    with pytest.raises(BudgetError, match="FLOPs budget"):
        _build("none")


@pytest.mark.parametrize("upto", ["lora", "prune", "retrain"])
def test_stage_checkpoints_resume_on_a_fresh_model(upto):
    torch.manual_seed(0)
    model = _build()
    m = model.pyra_method
    saved = {}
    for name in ["lora", "prune", "retrain"]:
        _train_stage(model, name, steps=2)
        state = json.loads(json.dumps(m.state()))  # JSON-able (it goes into the run record)
        saved[name] = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "method_state": state}
        if name == upto:
            break
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    # the trainer's resume: build, then restore + load every finished stage in order (strict load)
    fresh = _build()
    for name in ["lora", "prune", "retrain"]:
        fresh.pyra_method.restore(fresh, saved[name]["method_state"])
        fresh.load_state_dict(saved[name]["model"])
        if name == upto:
            break
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref)
    assert fresh.pyra_method.state() == m.state()
    assert count_parameters(fresh, fresh.pyra_method) == count_parameters(model, m)
    # the next stage starts from the restored model
    if upto != "retrain":
        nxt = {"lora": "prune", "prune": "retrain"}[upto]
        _train_stage(fresh, nxt, steps=1)


def test_parameter_count_by_hand():
    model = _build()
    m = model.pyra_method
    m.on_stage_start(_stage(m, "prune"), model)
    D, h = 48, 48
    per = (2 * D) + (D * h + h) + (h * h // 2 + h // 2) + (h // 2 * h // 4 + h // 4) + (h // 4 * 2 + 2)
    assert per == 3950 == TokenSelector.num_params(D, h)
    assert m.paper_param_count(model) == 3 * per
    pc = count_parameters(model, m)
    lora = 3 * (2 * 48 + 2 * 144)  # rank 2: A 48->2, B 2->144 per block
    assert pc.lora == lora and pc.method_paper == 3 * per
    assert pc.paper_pct == pytest.approx(100 * (lora + 3 * per) / pc.backbone)


@pytest.mark.slow
@pytest.mark.parametrize("hidden,paper_pct", [(1.0, None), (1.1585, 4.46)])
def test_vit_b16_budgets_and_counts(hidden, paper_pct, capsys):
    rows = []
    for sched, target in [("low", 0.50), ("high", 0.29)]:
        model = build_model("vit_b16_in21k", 100, "spvit", sched, method_kwargs={"selector_hidden": hidden})
        m = model.pyra_method
        m.on_stage_start(_stage(m, "prune"), model)
        pc = count_parameters(model, m)
        infer = merge_lora(model)
        frac, backbone_frac = _total_macs(infer) / m.full_macs, _backbone_macs(infer) / m.full_macs
        assert m.selector_blocks == [2, 5, 8] and abs(frac - target) < 0.005
        assert m.full_macs == pytest.approx(17.56e9, rel=2e-3)
        if paper_pct is not None:
            assert round(pc.paper_pct, 2) == paper_pct  # Tables 2/3: SPViT 4.46 % (both rates)
        rows.append(f"ViT-B/16 spvit {sched}: keep {m.keep} of 196, MACs {frac:.4f} ({m.full_macs * frac / 1e9:.2f} G; "
                    f"backbone {backbone_frac:.4f} + selectors {m.selector_macs() / 1e9:.3f} G), "
                    f"selector width {m.hidden}, selectors {pc.method_paper:,}, "
                    f"# params {pc.paper_pct:.2f} % (paper 4.46 %), floor {m.floor_fraction:.3f}")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
    assert not math.isnan(pc.paper_pct)
