"""RaP + LoRA (our ViT design): budgeted random widths, best-candidate selection, physical pruning."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pyra_bench.errors import ConfigError
from pyra_bench.methods.rap import RaPMethod, decode_mask, encode_mask, prune_block
from pyra_bench.methods.spvit import BudgetError
from pyra_bench.models import build_model, count_parameters
from pyra_bench.models.lora import LoRALinear
from pyra_bench.models.macs import model_macs

NC = 5



class FakeData:
    """What ``on_stage_start`` gets from the trainer: ``train_dataloader()`` and ``num_classes``."""

    num_classes = NC

    def __init__(self, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, NC, (n,), generator=g))

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=8, shuffle=True)


def _build(schedule="low", **kw):
    kw.setdefault("num_candidates", 6)
    kw.setdefault("eval_batches", 2)
    return build_model("vit_tiny_test", NC, "rap", schedule, method_kwargs=kw)


def _stage(method, name):
    return next(s for s in method.stages() if s.name == name)


def _train_stage(model, stage_name, data=None, steps=3, seed=0):
    method = model.pyra_method
    method.on_stage_start(_stage(method, stage_name), model, data)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, NC, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        assert method.extra_loss(model) is None
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _assert_shapes(model, heads, mlp, hd=16):
    for blk, h, m in zip(model.blocks, heads, mlp):
        a = blk.attn
        assert a.num_heads == len(h) and a.attn_dim == len(h) * hd
        assert a.qkv.weight.shape == (3 * len(h) * hd, 48) and a.qkv.bias.shape == (3 * len(h) * hd,)
        assert a.qkv.out_features == 3 * len(h) * hd and a.proj.in_features == len(h) * hd
        assert a.proj.weight.shape == (48, len(h) * hd)
        if isinstance(a.qkv, LoRALinear):
            assert a.qkv.lora_b.weight.shape == (3 * len(h) * hd, a.qkv.rank)
            assert a.qkv.lora_a.weight.shape == (a.qkv.rank, 48)
        assert blk.mlp.fc1.weight.shape == (len(m), 48) and blk.mlp.fc2.weight.shape == (48, len(m))


def test_three_stages_end_to_end_selection_shapes_and_budget():
    data = FakeData()
    model = _build("low")
    m = model.pyra_method
    assert [s.name for s in m.stages()] == ["lora", "prune", "retrain"]
    full = model_macs(model)
    _train_stage(model, "lora", data)
    assert m.kept_heads is None and model.blocks[0].attn.qkv.out_features == 144
    lora_b = model.blocks[0].attn.qkv.lora_b.weight.detach().clone()
    m.on_stage_start(_stage(m, "prune"), model, data)  # selection + pruning (the stage's start)
    h0 = torch.tensor(m.kept_heads[0])
    rows = torch.cat([(h0[:, None] * 16 + torch.arange(16)).reshape(-1) + j * 48 for j in range(3)])
    # the LoRA B rows of the kept q/k/v channels carry over: the LoRA stage's training is not lost
    assert torch.equal(model.blocks[0].attn.qkv.lora_b.weight, lora_b[rows])
    _train_stage(model, "prune", data)  # on_stage_start again: idempotent
    # every candidate was scored on the same fixed batches; the lowest loss won
    assert all("loss" in c for c in m.candidates) and len(m.candidates) == 6
    assert m.chosen == min(range(6), key=lambda i: m.candidates[i]["loss"])
    cand = m.candidates[m.chosen]
    assert [len(h) for h in m.kept_heads] == cand["heads"] and [len(c) for c in m.kept_mlp] == cand["mlp"]
    _assert_shapes(model, m.kept_heads, m.kept_mlp)
    bias0 = model.blocks[0].attn.proj.bias.detach().clone()
    _train_stage(model, "retrain", data)
    assert not torch.equal(model.blocks[0].attn.proj.bias, bias0)  # biases re-train (lora+bias+norm)
    assert not model.blocks[0].attn.qkv.weight.requires_grad and not model.blocks[0].mlp.fc1.weight.requires_grad

    infer = m.inference_model(model)
    _assert_shapes(infer, m.kept_heads, m.kept_mlp)
    assert type(infer.blocks[0].attn.qkv) is torch.nn.Linear  # LoRA folded in
    frac = model_macs(infer) / full
    assert abs(frac - 0.50) <= m.budget_tolerance and frac == pytest.approx(m.macs_fraction)
    assert sum(p.numel() for p in infer.blocks.parameters()) < sum(
        p.numel() for p in build_model("vit_tiny_test", NC, "peft").blocks.parameters())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(infer(x), model(x), rtol=1e-4, atol=1e-5)


def test_pruning_equals_masking_the_dropped_channels():
    """A pruned block computes what the unpruned (LoRA-adapted) block computes with the dropped heads' proj
    columns and the dropped MLP channels' fc2 columns zeroed: exact slicing, LoRA included."""
    torch.manual_seed(0)
    model = _build("low")
    for blk in model.blocks:  # a non-trivial LoRA
        torch.nn.init.normal_(blk.attn.qkv.lora_b.weight, std=0.1)
    heads, mlp = [[0, 2], [1], [0, 1, 2]], [list(range(0, 96, 2)), [5, 7, 90], list(range(96))]
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for blk, h, c in zip(masked.blocks, heads, mlp):
            for j in set(range(3)) - set(h):
                blk.attn.proj.weight[:, j * 16:(j + 1) * 16] = 0
            drop = sorted(set(range(96)) - set(c))
            blk.mlp.fc2.weight[:, drop] = 0
    model.pyra_method.prune(model, heads, mlp)
    _assert_shapes(model, heads, mlp)
    model.eval(), masked.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked(x), rtol=1e-4, atol=1e-5)


def test_keep_all_is_the_identity():
    model = _build("low")
    ref = copy.deepcopy(model).eval()
    for blk in model.blocks:
        prune_block(blk, [0, 1, 2], list(range(96)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x))


def test_sampler_is_seeded_and_on_budget():
    a, b = _build("low", seed=3).pyra_method, _build("low", seed=3).pyra_method
    c = _build("low", seed=4).pyra_method
    assert a.candidates == b.candidates and a.candidates != c.candidates
    for cand in a.candidates:
        assert abs(cand["macs_fraction"] - 0.5) <= a.budget_tolerance
        assert all(1 <= h <= 3 for h in cand["heads"]) and all(8 <= x <= 96 and x % 8 == 0 for x in cand["mlp"])
    assert len({(tuple(c["heads"]), tuple(c["mlp"])) for c in a.candidates}) == len(a.candidates)


def test_mask_encoding_round_trips():
    for idx in ([0], [95], list(range(0, 96, 3)), list(range(4096)), [5, 700, 4095]):
        assert decode_mask(encode_mask(idx)) == idx
    assert encode_mask([0, 1, 2, 3, 8]) == "10f"


def test_selection_is_deterministic_and_leaves_the_global_rng_alone():
    data = FakeData()
    picks = []
    first = _build("low", criterion="random")
    for model in (first, copy.deepcopy(first)):
        torch.manual_seed(123)
        model.pyra_method.on_stage_start(_stage(model.pyra_method, "prune"), model, data)
        assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(123)))
        picks.append((model.pyra_method.chosen, model.pyra_method.kept_heads, model.pyra_method.kept_mlp,
                      [c["loss"] for c in model.pyra_method.candidates]))
    assert picks[0] == picks[1]


def test_no_data_warns_and_takes_the_first_candidate():
    model = _build("low")
    with pytest.warns(UserWarning, match="no training data"):
        model.pyra_method.on_stage_start(_stage(model.pyra_method, "prune"), model, None)
    assert model.pyra_method.chosen == 0


def test_budget_errors():
    with pytest.raises(BudgetError, match="floor"):
        _build("high")  # tiny backbone: one head + 8 MLP channels per block is 31.7 % of the MACs
    with pytest.raises(BudgetError, match="FLOPs budget"):
        _build("none")
    with pytest.raises(ConfigError, match="valid choices"):  # an InputError that is still a ValueError
        _build("low", criterion="taylor")


@pytest.mark.parametrize("upto", ["lora", "prune", "retrain"])
def test_stage_checkpoints_resume_on_a_fresh_model(upto):
    data = FakeData()
    model = _build("low")
    m = model.pyra_method
    saved = {}
    for name in ["lora", "prune", "retrain"]:
        _train_stage(model, name, data, steps=2)
        state = json.loads(json.dumps(m.state()))  # JSON-able (it goes into the run record)
        saved[name] = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "method_state": state}
        if name == upto:
            break
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
    fresh = _build("low")
    for name in ["lora", "prune", "retrain"]:
        fresh.pyra_method.restore(fresh, saved[name]["method_state"])
        fresh.load_state_dict(saved[name]["model"])  # strict: pruned shapes re-created before the load
        if name == upto:
            break
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), ref)
    assert fresh.pyra_method.state() == m.state()
    assert count_parameters(fresh, fresh.pyra_method) == count_parameters(model, m)
    if upto != "retrain":
        _train_stage(fresh, {"lora": "prune", "prune": "retrain"}[upto], data, steps=1)
        if upto == "lora":  # the resumed prune stage picks the same sub-network
            assert fresh.pyra_method.kept_heads is not None


def test_parameter_count_by_hand():
    model = _build("low")
    m = model.pyra_method
    with pytest.warns(UserWarning):
        m.on_stage_start(_stage(m, "prune"), model, None)
    hs, ms = [len(h) for h in m.kept_heads], [len(c) for c in m.kept_mlp]
    bias = sum(3 * h * 16 + 48 + c + 48 for h, c in zip(hs, ms))  # qkv, proj, fc1, fc2 biases
    norms = 3 * 2 * (2 * 48) + 2 * 48  # norm1/norm2 per block + the final norm
    assert m.paper_param_count(model) == bias + norms
    pc = count_parameters(model, m)
    assert pc.lora == sum(2 * 48 + 3 * h * 16 * 2 for h in hs)  # A: 48->2 kept, B rows sliced
    assert pc.method_paper == bias + norms
    plain = _build("low", retrain_params="lora")
    with pytest.warns(UserWarning):
        plain.pyra_method.on_stage_start(_stage(plain.pyra_method, "prune"), plain, None)
    assert plain.pyra_method.paper_param_count(plain) == 0


def test_method_constructor_checks():
    with pytest.raises(ConfigError, match="retrain_params"):
        RaPMethod("low", retrain_params="everything")


@pytest.mark.slow
def test_vit_b16_budgets_and_counts(capsys):
    rows = []
    for sched, target in [("low", 0.50), ("high", 0.29)]:
        model = build_model("vit_b16_in21k", 100, "rap", sched)
        m = model.pyra_method
        full_backbone = count_parameters(model, m).backbone
        with pytest.warns(UserWarning):
            m.on_stage_start(_stage(m, "prune"), model, None)
        pc = count_parameters(model, m)
        infer = m.inference_model(model)
        frac = model_macs(infer) / m.full_macs
        assert abs(frac - target) <= m.budget_tolerance
        assert all(b.mlp.fc1.out_features % 64 == 0 for b in infer.blocks)
        paper = {"low": 3.43, "high": 0.86}[sched]
        rows.append(
            f"ViT-B/16 rap {sched}: heads {[len(h) for h in m.kept_heads]}, MLP {[len(c) for c in m.kept_mlp]}, "
            f"MACs {frac:.4f} ({m.full_macs * frac / 1e9:.2f} G); LoRA {pc.lora:,} + re-trained {pc.method_paper:,} = "
            f"{100 * pc.paper_counted / full_backbone:.2f} % of the unpruned backbone "
            f"({pc.paper_pct:.2f} % of the pruned one; paper {paper} %)")
    with capsys.disabled():
        print("\n" + "\n".join(rows))
