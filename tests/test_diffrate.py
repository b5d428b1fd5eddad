"""DiffRate + LoRA: golden values from the official code's semantics (hand-worked), hard path, search, stages."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import tokens_leaving_blocks

from pyra_bench.methods.diffrate import (
    PUBLISHED,
    DiffRateReducer,
    RateLogits,
    ScheduleError,
    class_attention,
    merge_into_kept,
    sort_by_importance,
)
from pyra_bench.models import BudgetError, build_model
from pyra_bench.models.macs import model_macs, vit_macs

NC = 5
N_TINY = 17  # vit_tiny_test: 16 patches + class token, 3 blocks



def _build(compression="flops:0.7", **kw):
    kw.setdefault("granularity", 2)
    return build_model("vit_tiny_test", NC, "diffrate", compression, method_kwargs=kw)



# -- golden values (worked by hand from DiffRate's ddp.py / merge.py) ------------------------------------
def test_rate_logits_expected_count_mask_and_gradients():
    r = RateLogits(num_patches=8, granularity=2)
    assert r.candidates.tolist() == [8, 6, 4, 2]
    assert float(r.expected()) == 5.0 and float(r.kept()) == 5.0  # + class token = DiffRate's 6
    # p_i = sum_c p_c [i < c] over patch positions (DiffRate's positions 1..8 after the class token)
    assert r.token_probability(8).tolist() == pytest.approx([1, 1, .75, .75, .5, .5, .25, .25])
    assert r.mask(8).tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    r.kept().backward()  # straight-through ceil: d kept / d logit_c = p_c (c - E)
    assert r.logits.grad.tolist() == pytest.approx([0.75, 0.25, -0.25, -0.75])
    r.logits.grad = None
    r.mask(8).sum().backward()  # sum of the mask has the same gradient
    assert r.logits.grad.tolist() == pytest.approx([0.75, 0.25, -0.25, -0.75])


def test_merge_golden_unweighted_mean_and_similarity_scaled_sizes():
    x = torch.tensor([[[9., 9], [1, 0], [0, 1], [0.9, 0.1], [0.2, 1.0]]])
    out, size = merge_into_kept(x, torch.ones(1, 5, 1), kept=3, num_protected=1)
    assert out[0].flatten().tolist() == pytest.approx([9, 9, 0.95, 0.05, 0.1, 1.0])
    s1, s2 = 0.9 / math.hypot(0.9, 0.1), 1.0 / math.hypot(0.2, 1.0)  # cosine to [1,0] and to [0,1]
    assert size[0, :, 0].tolist() == pytest.approx([1, 1 + s1, 1 + s2], abs=1e-6)
    assert s1 == pytest.approx(0.9939, abs=1e-4) and s2 == pytest.approx(0.9806, abs=1e-4)


def test_merge_never_into_protected_tokens():
    x = torch.tensor([[[1., 0], [0, 1], [1, 0.01]]])  # token 2 is most similar to the class token
    out, size = merge_into_kept(x, torch.ones(1, 3, 1), kept=2, num_protected=1)
    assert out[0, 0].tolist() == [1, 0] and size[0, 0, 0] == 1  # class token untouched
    assert out[0, 1].tolist() == pytest.approx([0.5, 0.505])


def test_class_attention_matches_an_explicit_float64_attention():
    g = torch.Generator().manual_seed(0)
    B, H, N, d = 2, 3, 7, 4
    q, k = torch.randn(B, H, N, d, generator=g), torch.randn(B, H, N, d, generator=g)
    size = torch.rand(B, N, 1, generator=g) * 3 + 1
    logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(d) + size.double().log().view(B, 1, 1, N)
    ref = logits.softmax(-1).mean(1)[:, 0]
    assert torch.allclose(class_attention(q, k, size).double(), ref, atol=1e-6)


def test_sort_keeps_protected_tokens_in_front():
    x = torch.arange(6.).view(1, 6, 1).expand(2, 6, 1)
    imp = torch.tensor([[0, 0, .1, .5, .2, .9], [1, 1, .9, .1, .2, .3]])
    xs, _ = sort_by_importance(x, torch.ones(2, 6, 1), imp, num_protected=2)
    assert xs[..., 0].tolist() == [[0, 1, 5, 3, 4, 2], [0, 1, 2, 5, 4, 3]]


# -- the hard path --------------------------------------------------------------------------------------
def test_hard_reducer_counts_order_and_class_token():
    prune, merge = [17, 12, 9], [17, 10, 11]
    model = _build(kept_schedule={"prune_kept": prune, "merge_kept": merge})
    m = model.pyra_method
    assert [s.name for s in m.stages()] == ["train"] and m.source == "given"
    x = torch.randn(3, 3, 32, 32)
    assert tokens_leaving_blocks(model, x) == [17, 10, 9] == m.tokens_after_blocks()  # min(prev, prune, merge)
    assert [b.token_reducer.tokens_out(n) if b.token_reducer else n for b, n in zip(model.blocks, [17, 17, 10])] \
        == [17, 10, 9]
    # the class token is never moved or merged: the block output's token 0 equals the unreduced block's
    model.eval()
    with torch.no_grad():
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        h, size = model.blocks[0](h, None)
        out, _ = model.blocks[1](h, size)
        red, model.blocks[1].token_reducer = model.blocks[1].token_reducer, None
        ref, _ = model.blocks[1](h, size)
        model.blocks[1].token_reducer = red
    assert torch.allclose(out[:, 0], ref[:, 0], atol=1e-6)
    assert m.paper_param_count(model) == 0


def test_pruning_keeps_the_most_attended_tokens():
    g = torch.Generator().manual_seed(1)
    B, H, N, d, D = 2, 2, 9, 4, 5
    q, k = torch.randn(B, H, N, d, generator=g), torch.randn(B, H, N, d, generator=g)
    x = torch.randn(B, N, D, generator=g)
    out, size = DiffRateReducer(prune_kept=5, merge_kept=9, num_protected=1)(x, None, q, k)
    attn = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1).mean(1)[:, 0, 1:]
    for b in range(B):
        top = (attn[b].argsort(descending=True)[:4] + 1).tolist()
        assert out[b, 1:].tolist() == x[b, top].tolist()
    assert (size == 1).all()


@pytest.mark.parametrize("key,depth,dim,gmacs", [("deit_b_8.7", 12, 768, 8.7), ("deit_b_11.5", 12, 768, 11.5),
                                                  ("mae_b_8.7", 12, 768, 8.7), ("mae_l_31.0", 24, 1024, 31.0)])
def test_published_schedules_reproduce_their_gmacs_labels(key, depth, dim, gmacs):
    s = PUBLISHED[key]
    reds = [DiffRateReducer(p, m, 1) for p, m in zip(s["prune_kept"], s["merge_kept"])]
    t_in, n = [], 197
    t_out = []
    for r in reds:
        t_in.append(n)
        n = r.tokens_out(n)
        t_out.append(n)
    macs = vit_macs(t_in, t_out, dim, [dim] * depth, [4 * dim] * depth, 196, 768, num_classes=1000)
    assert macs / 1e9 == pytest.approx(gmacs, abs=0.05)


def test_published_schedule_on_vit_b16():
    model = build_model("vit_b16_in21k", 10, "diffrate", "low", pretrained=False,
                        method_kwargs={"kept_schedule": "published:deit_b_8.7"})
    m = model.pyra_method
    assert model_macs(model) / 1e9 == pytest.approx(8.7, abs=0.05)
    assert m.macs_fraction() == pytest.approx(model_macs(model) / 17.56e9, abs=0.002)
    assert m.state()["source"] == "published:deit_b_8.7"


@pytest.mark.parametrize("kw,match", [
    ({"kept_schedule": {"prune_kept": [17, 9], "merge_kept": [17, 9, 9]}}, "one kept-token count per block"),
    ({"kept_schedule": {"prune_kept": [17, 9, 30], "merge_kept": [17, 9, 9]}}, r"prune_kept\[2\] = 30 is outside"),
    ({"kept_schedule": {"prune_kept": [17, 9, 1], "merge_kept": [17, 9, 9]}}, r"outside \[2, 17\]"),
    ({"kept_schedule": "published:vit_z"}, "valid: deit_b_8.7"),
    ({"kept_schedule": "/nonexistent/schedule.json"}, "cannot read the DiffRate schedule file"),
    ({"search_objective": "mse"}, "valid choices: distill, ce"),
])
def test_bad_schedules_are_refused_clearly(kw, match):
    with pytest.raises(ValueError, match=match):
        _build(**kw)


def test_unreachable_budget_is_refused_when_the_model_is_built():
    # vit_tiny_test, granularity 2: block 0 whole (17 tokens), blocks 1-2 keep the class token + 2 patches:
    # hand-counted MACs (patch embedding 16*192*48; attention 17*48*144 + 2*17^2*48 + 17*48*48; MLP 2*n*48*96)
    D, H = 48, 96
    attn = 17 * D * 3 * D + 2 * 17 * 17 * D + 17 * D * D
    floor = 16 * 192 * D + 2 * attn + 2 * 17 * D * H + 2 * 3 * D * H + (3 * D * 3 * D + 2 * 9 * D + 3 * D * D) + 2 * 3 * D * H
    full = 16 * 192 * D + 3 * (attn + 2 * 17 * D * H)
    with pytest.raises(BudgetError, match=rf"budget of 0.500 .* can reach .*: {floor / full:.3f}"):
        _build("flops:0.5")


def test_budget_miss_is_marked_in_the_state():
    # a given schedule far from the budget: kept as given, flagged for the record and the tables
    with pytest.warns(UserWarning, match="away from the budget"):
        far = _build("flops:0.9", kept_schedule={"prune_kept": [17, 9, 5], "merge_kept": [17, 9, 5]})
    s = far.pyra_method.state()
    assert s["budget_miss"] is True and abs(s["macs_fraction"] - 0.9) > s["budget_tolerance"]
    near = _build(f"flops:{s['macs_fraction']:.3f}", kept_schedule={"prune_kept": [17, 9, 5], "merge_kept": [17, 9, 5]})
    assert near.pyra_method.state()["budget_miss"] is False


def test_search_needs_a_budget():
    with pytest.raises(ScheduleError, match="compression=low"):
        _build("none")


# -- the search ---------------------------------------------------------------------------------------
def _search(model, steps, lr=0.1):
    m = model.pyra_method
    m.on_stage_start(m.stages()[0], model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    fracs = []
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, NC, (8,), generator=g)
        loss, logits = m.training_loss(model, x, y)
        assert logits is None  # label-free
        loss = loss + m.extra_loss(model)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in params)
        opt.step()
        fracs.append(float(m.search_macs(model).detach()) / m.full_macs)
    return fracs


def test_search_trains_only_the_rate_logits_and_meets_the_budget():
    model = _build("flops:0.7")
    m = model.pyra_method
    assert [s.name for s in m.stages()] == ["search", "train"]
    reds = m.search_reducers(model)
    assert len(reds) == 2 and model.blocks[0].token_reducer is None  # block 0 is never compressed
    lora_before = model.blocks[1].attn.qkv.lora_a.weight.detach().clone()
    fracs = _search(model, 40)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"blocks.{i}.token_reducer.{k}.logits" for i in (1, 2) for k in ("prune", "merge")}
    assert torch.equal(model.blocks[1].attn.qkv.lora_a.weight, lora_before)
    assert fracs[0] > 0.8 and abs(fracs[-1] - 0.7) < 0.05, fracs
    # the search masks tokens, it does not remove them
    assert tokens_leaving_blocks(model, torch.randn(2, 3, 32, 32)) == [17, 17, 17]
    # fixing the schedule: logits dropped, LoRA + head train, tokens removed as searched
    m.on_stage_start(m.stages()[1], model)
    assert not m.search_reducers(model)
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} >= {"lora_a", "lora_b", "head"}
    assert not any("token_reducer" in n for n, _ in model.named_parameters())
    infer = m.inference_model(model)
    assert tokens_leaving_blocks(infer, torch.randn(2, 3, 32, 32)) == m.tokens_after_blocks()
    assert model_macs(infer) / m.full_macs == pytest.approx(m.macs_fraction())
    assert abs(m.macs_fraction() - 0.7) <= 0.06
    assert m.paper_param_count(model) == 0


def test_search_masks_enter_attention_and_gradients_reach_earlier_blocks():
    model = _build("flops:0.7")
    m = model.pyra_method
    m.on_stage_start(m.stages()[0], model)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    loss, _ = m.training_loss(model, x, None)
    loss.backward()  # the objective alone (no MACs term): the masks change the features
    g = model.blocks[1].token_reducer.prune.logits.grad
    assert g is not None and g.abs().sum() > 0


def test_search_reducer_masks_what_the_hard_reducer_removes():
    """With saturated logits the masked search path and the hard path give the same class token."""
    model = _build("flops:0.7")
    m = model.pyra_method
    red = m.search_reducers(model)
    for r, (p, q) in zip(red, [(6, 4), (2, 2)]):  # kept patches: prune 6 / merge 4, then 2 / 2
        with torch.no_grad():
            for rl, keep in ((r.prune, p), (r.merge, q)):
                rl.logits.fill_(-50.0)
                rl.logits[rl.candidates.tolist().index(keep)] = 50.0
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        soft = model.forward_features(x)[:, 0]
    assert [r.kept() for r in red] == [(7, 5), (3, 3)]
    m.on_stage_start(m.stages()[1], model)
    with torch.no_grad():
        hard = model.forward_features(x)[:, 0]
    assert m.tokens_after_blocks() == [17, 5, 3]
    # masked keys keep EPS of their weight (log 1e-6 bias): equal to ~1e-5, not bit-exact
    assert torch.allclose(soft, hard, atol=1e-4), (soft - hard).abs().max()


def test_stage_checkpoints_restore_on_a_fresh_model(tmp_path):
    model = _build("flops:0.7")
    m = model.pyra_method
    _search(model, 10)
    state, sd = m.state(), {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _build("flops:0.7")
    fresh.pyra_method.restore(fresh, state)
    fresh.load_state_dict(sd)  # strict: the search reducers and their logits are back
    assert [r.kept() for r in fresh.pyra_method.search_reducers(fresh)] == [r.kept() for r in m.search_reducers(model)]
    m.on_stage_start(m.stages()[1], model)
    state, sd = m.state(), model.state_dict()
    fresh = _build("flops:0.7")
    fresh.pyra_method.restore(fresh, state)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    assert fresh.pyra_method.tokens_after_blocks() == m.tokens_after_blocks()
    # the searched schedule of a finished run is reusable as a file (a run record works too)
    import json

    (tmp_path / "rec.json").write_text(json.dumps({"method_state": state}))
    again = _build("flops:0.7", kept_schedule=str(tmp_path / "rec.json"))
    assert again.pyra_method.tokens_after_blocks() == m.tokens_after_blocks()
    assert again.pyra_method.source.startswith("file:")


def test_ce_objective_uses_the_labels():
    model = _build("flops:0.7", search_objective="ce")
    m = model.pyra_method
    m.on_stage_start(m.stages()[0], model)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, NC, (4,))
    loss, logits = m.training_loss(model, x, y)
    assert logits.shape == (4, NC) and torch.allclose(loss, F.cross_entropy(logits, y))


def test_search_on_other_data_is_checked_before_training(tmp_path):
    from hydra import compose, initialize_config_dir

    from pyra_bench.train import train

    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=[
            "task=digits", "backbone=vit_tiny_test", "trainer=smoke", "method=diffrate", "compression=flops:0.8",
            "method.kwargs.search_task=cifar100", f"data_root={tmp_path}/nowhere",
            f"results_dir={tmp_path}/results", f"run_dir={tmp_path}/run"])
    with pytest.raises(FileNotFoundError, match="pyra_bench.data.prepare"):
        train(cfg)
    assert not (tmp_path / "run" / "ckpt").exists()
