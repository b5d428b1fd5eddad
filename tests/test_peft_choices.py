"""The ``peft`` choices beside LoRA (adapter, vpt, prefix): hand-counted parameters and MACs of ViT-B/16,
float64 parity against a direct re-computation of each definition (merging off, ToMe and PYRA merging on),
torch's FLOP counter, every token-reduction method, training runs, run ids, table rows, listings and the
input contract. Tiny random-weight ViTs, except ViT-B/16 on the meta device (shapes only)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.cli import run_entry_point
from helpers.runs import run_config
from reference import tome_merge
from torch.utils.flop_counter import FlopCounterMode

from pyra_bench import identity, info, tables
from pyra_bench.errors import ConfigCheckError
from pyra_bench.models import build_model, count_parameters, get_backbone
from pyra_bench.models.macs import model_macs
from pyra_bench.models.peft import make_peft, peft_parameter_names

CHOICES = ("adapter", "vpt", "prefix")
D, L, N, C = 768, 12, 197, 100  # ViT-B/16 at 224: width, depth, tokens, classes here


# ---------------------------------------------------------------------------------------------------------
# ViT-B/16 (meta device): trainable parameters and MACs against hand counts of the official definitions
# ---------------------------------------------------------------------------------------------------------
def _vit_b(peft):
    with torch.device("meta"):
        return build_model("vit_b16_in21k", C, "peft", "none", peft=peft)


def _hand_macs(tokens: int, adapter: int = 0, extra_keys: int = 0) -> int:
    """ViT-B/16's matmul MACs of one image: patch embedding, per block qkv + q@k^T + attn@v + proj + MLP
    (+ an adapter's two matmuls, + prefix keys/values in q@k^T and attn@v)."""
    block = (tokens * D * 3 * D + 2 * tokens * (tokens + extra_keys) * D + tokens * D * D + 2 * tokens * D * 4 * D
             + 2 * tokens * D * adapter)
    return 196 * (3 * 16 * 16) * D + L * block


def test_vit_b16_trainable_parameters_and_macs_equal_hand_counts():
    head = D * C + C
    cases = {  # peft -> (its parameters by hand, tokens per block, adapter dim, extra keys)
        "adapter": (L * (D * 8 + 8 + 8 * D + D), N, 8, 0),   # dim null = ViT-B's 8: down W+b, up W+b
        "vpt": (L * 10 * D, N + 10, 0, 0),                    # 10 prompts of width D per block (block 0's too)
        "prefix": (L * 2 * 10 * D, N, 0, 10),                 # 10 keys + 10 values of width D per attention
    }
    for name, (hand, tokens, a, k) in cases.items():
        model = _vit_b({"name": name})
        pc = count_parameters(model, model.pyra_method)
        assert pc.peft == hand and pc.lora == 0 and pc.method == 0, name
        assert pc.trainable == hand + head and pc.head == head
        assert pc.paper_counted == hand and pc.backbone == 85_798_656
        assert model_macs(model) == _hand_macs(tokens, a, k), name
        assert model.pyra_context.num_tokens == tokens
        assert model.pyra_context.num_protected == 1 + (10 if name == "vpt" else 0)
    lora = count_parameters(m := _vit_b(None), m.pyra_method)  # the default, unchanged: rank 8 on qkv
    assert lora.lora == L * (D * 8 + 8 * 3 * D) and lora.peft == 0 and model_macs(m) == _hand_macs(N)
    # the official adapter dims for ViT-S / B / L: 4 / 8 / 12 (peft.dim: null)
    assert [get_backbone(b).peft_dim for b in ("vit_s16_in21k", "vit_b16_in21k", "vit_l16_in21k")] == [4, 8, 12]


# ---------------------------------------------------------------------------------------------------------
# float64 parity: a direct re-computation of each definition
# ---------------------------------------------------------------------------------------------------------
def _heads(t, H):  # (n, D) -> (H, n, hd)
    return t.view(t.shape[0], H, -1).transpose(0, 1)


def _reference(model, img, schedule, peft):
    """Logits of one image by the definitions: VPT-deep (prompts after the class token, each block's own,
    dropped before the head), an adapter ``h + up(QuickGELU(down(h)))`` on the MLP branch, prefix keys and
    values appended in every attention (bias log 1 = 0), ToMe merging with proportional attention."""
    pe = model.patch_embed.proj
    t = F.conv2d(img[None], pe.weight, pe.bias, stride=pe.stride).flatten(2).transpose(1, 2)[0]
    t = torch.cat([model.cls_token[0], t]) + model.pos_embed[0]
    P = 10 if peft == "vpt" else 0
    t = torch.cat([t[:1], torch.zeros(P, t.shape[1], dtype=t.dtype), t[1:]])
    size = torch.ones(t.shape[0], dtype=t.dtype)
    for blk, r in zip(model.blocks, schedule):
        if peft == "vpt":
            t = torch.cat([t[:1], blk.prompts.tokens[0], t[1 + P:]])
        a = blk.attn
        H, n = a.num_heads, t.shape[0]
        qkv = F.linear(blk.norm1(t), a.qkv.weight, a.qkv.bias)
        q, k, v = (_heads(qkv[:, i * a.qkv.out_features // 3:(i + 1) * a.qkv.out_features // 3], H) for i in range(3))
        keys, values, bias = k, v, size.log()
        if peft == "prefix":
            keys = torch.cat([k, _heads(a.prefix.keys[0], H)], dim=1)
            values = torch.cat([v, _heads(a.prefix.values[0], H)], dim=1)
            bias = torch.cat([bias, torch.zeros(a.prefix.num_tokens, dtype=t.dtype)])  # size 1: log 1 = 0
        w = (q @ keys.transpose(1, 2) / math.sqrt(q.shape[-1]) + bias).softmax(-1)
        t = t + a.proj((w @ values).transpose(0, 1).reshape(n, -1))
        if r:
            mod = blk.token_reducer.modulator
            t, size = tome_merge(t, size, k.mean(0), r, 1 + P,
                             None if mod is None else (lambda S, T, mod=mod: mod(S[None], T[None])[0]))
        h = blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(blk.norm2(t))))
        if peft == "adapter":
            z = F.linear(h, blk.adapter.down.weight, blk.adapter.down.bias)
            h = h + F.linear(z * torch.sigmoid(1.702 * z), blk.adapter.up.weight, blk.adapter.up.bias)
        t = t + h
    t = torch.cat([t[:1], t[1 + P:]])
    return model.head(model.norm(t)[0]), size


@pytest.mark.parametrize("peft", CHOICES)
@pytest.mark.parametrize("method,schedule", [("peft", [0, 0, 0]), ("tome", [3, 2, 2]), ("pyra", [3, 2, 2])])
def test_float64_parity_with_a_direct_recomputation(peft, method, schedule):
    torch.manual_seed(1)
    model = build_model("vit_tiny_test", 5, method, "none" if method == "peft" else schedule, peft=peft)
    with torch.no_grad():
        for p in model.parameters():  # every parameter non-trivial (PYRA's gates, adapters, prompts, prefix)
            p.copy_(torch.randn_like(p) * 0.3)
    model = model.double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        for b in range(2):
            ref, size = _reference(model, x[b], schedule, peft)
            torch.testing.assert_close(out[b], ref, rtol=1e-9, atol=1e-9)
            assert size.sum() == 17 + (10 if peft == "vpt" else 0)
    if method == "tome":  # the PEFT modules change the result (the check is not vacuous)
        plain = build_model("vit_tiny_test", 5, method, schedule).double().eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()}, strict=False)
        assert (plain(x) - out).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# MACs against torch's FLOP counter; every token-reduction method; the inference model keeps the modules
# ---------------------------------------------------------------------------------------------------------
def _counted(model) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randn(1, 3, 32, 32, device="meta"))
    return fc.get_total_flops() // 2


@pytest.mark.parametrize("peft", CHOICES)
def test_analytic_macs_equal_torchs_flop_counter(peft):
    for method, schedule in (("peft", "none"), ("tome", "r2")):
        with torch.device("meta"):
            model = build_model("vit_tiny_test", 5, method, schedule, peft=peft)
        infer = model.pyra_method.inference_model(model)  # does not fold: the modules stay, and are counted
        assert peft_parameter_names(infer) and not any(".lora_" in n for n in infer.state_dict())
        analytic, counted = model_macs(infer, include_head=True), _counted(infer)
        if method == "peft":
            assert counted == analytic
        else:  # + ToMe's matching matmuls, which the analytic count leaves out
            assert 0 <= counted - analytic <= 0.01 * analytic


@pytest.mark.parametrize("peft", CHOICES)
def test_every_token_reduction_method_composes(peft):
    """Each method builds, runs forward and backward with the PEFT modules trainable; the prompts are
    protected; RaP's head pruning slices the prefix keys/values with the heads."""
    x = torch.randn(2, 3, 32, 32)
    for method, compression in (("tome", "r2"), ("pyra", "r2"), ("evit", "flops:0.7"), ("diffrate", "flops:0.85"),
                                ("spvit", "flops:0.85"), ("rap", "flops:0.7")):
        model = build_model("vit_tiny_test", 5, method, compression, peft=peft)
        assert model.pyra_context.num_protected == 1 + (10 if peft == "vpt" else 0)
        model(x).sum().backward()
        pc = count_parameters(model, model.pyra_method)
        assert pc.peft > 0 and pc.lora == 0
        names = set(model.pyra_method.method_parameters(model))
        assert not any(k in n for n in names for k in ("adapter", "prompts", "prefix")), method
    model.pyra_method.prune(model, [[0, 2]] * 3, [list(range(48))] * 3)  # rap (the last): 2 of 3 heads
    assert model(x).shape == (2, 5)
    if peft == "prefix":
        assert model.blocks[0].attn.prefix.keys.shape == (1, 10, 32)


# ---------------------------------------------------------------------------------------------------------
# Runs: training (in this process, and once as `python -m pyra_bench.train`), export, ids, tables, listings
# ---------------------------------------------------------------------------------------------------------
RUN = ["task=digits", "backbone=vit_tiny_test", "trainer=smoke", "trainer.epochs=1", "trainer.warmup_epochs=0",
       "logger=none", "method=pyra", "compression=low"]


@pytest.mark.parametrize("peft", CHOICES)
def test_trains_writes_a_record_and_exports_a_model_that_keeps_its_peft(peft, tmp_path):
    from pyra_bench.export import load_inference_model
    from pyra_bench.train import train

    cfg = run_config(RUN, tmp_path, f"peft={peft}", "export_inference_model=true")
    rec = train(cfg)
    assert rec["status"] == "completed" and rec["run_id"] == f"digits__vit_tiny_test__pyra+{peft}__low__seed0"
    assert rec["params"]["peft"] > 0 and rec["params"]["lora"] == 0 and rec["flops"]["gmacs"] > 0
    assert Path(cfg.results_dir, f"{rec['run_id']}.json").is_file()
    model = load_inference_model(cfg.run_dir)
    key = {"adapter": ".adapter.down.weight", "vpt": ".prompts.tokens", "prefix": ".attn.prefix.keys"}[peft]
    assert any(k.endswith(key) for k in model.state_dict())


def test_python_m_train_with_an_adapter(tmp_path):
    """The command of the issue (with the tiny backbone, so the demo backbone is not pre-trained here)."""
    p = subprocess.run([sys.executable, "-m", "pyra_bench.train", "method=pyra", "peft=adapter", "trainer=smoke",
                        "backbone=vit_tiny_test", "logger=none", "trainer.epochs=1", "trainer.warmup_epochs=0",
                        f"run_dir={tmp_path}/run", f"results_dir={tmp_path}/results"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (rec,) = Path(tmp_path, "results").glob("*.json")
    assert rec.name == "digits__vit_tiny_test__pyra+adapter__low__seed0.json"


def test_run_ids_name_a_non_default_peft_only(tmp_path):
    assert identity.run_id(run_config(RUN, tmp_path)) == "digits__vit_tiny_test__pyra__low__seed0"  # unchanged
    for peft in CHOICES:
        assert identity.run_id(run_config(RUN, tmp_path, f"peft={peft}")).endswith(f"__pyra+{peft}__low__seed0")
    assert identity.peft_suffix(None) == identity.peft_suffix({"name": "lora", "rank": 4}) == ""


def test_each_non_lora_peft_gets_its_own_table_rows():
    base = {"run_id": "x", "status": "completed", "task": "cifar100", "backbone": "vit_b16_in21k", "method": "pyra",
            "schedule": "low", "seed": 0, "metrics": {"test_top1": 50.0}}
    keys = [tables.record_key({**base, "settings": {"peft.name": p}})["run_tag"] for p in ("lora", *CHOICES)]
    assert keys == ["", "peft=adapter", "peft=vpt", "peft=prefix"]
    assert tables.record_key(base)["run_tag"] == ""  # older records (no peft setting): LoRA


def test_listings_and_help_name_the_choices_and_their_options():
    rows = dict(info.peft())
    assert list(rows)[0] == "peft=lora"
    for peft, opts in (("adapter", ("dim=null", "dropout=0.1", "init=standard")), ("vpt", ("num_tokens=10",)),
                       ("prefix", ("num_tokens=10",))):
        assert f"peft={peft}" in rows
        assert all(f"peft={peft} peft.{o}" in rows for o in opts)
    assert "== PEFT choices (peft=" in info.help_text("all")


def test_bad_values_are_refused_through_the_schema(tmp_path, monkeypatch, capsys):
    from pyra_bench.train import cli

    for args, fragment in ((["peft=adapter", "peft.dim=0"], "peft.dim=0: must be null (the backbone's adapter_dim"),
                           (["peft=vpt", "peft.num_tokens=2.5"], "peft.num_tokens=2.5: must be a whole number >= 1"),
                           (["peft=nope"], "unknown peft 'nope'; valid choices: adapter, lora, prefix, vpt")):
        cwd = tmp_path / args[-1].replace("=", "_")
        cwd.mkdir()
        code, out, err = run_entry_point(cli, "pyra_bench/train.py", ["backbone=vit_tiny_test", *args], cwd,
                                         monkeypatch, capsys, env={"HYDRA_FULL_ERROR": "0"})
        assert code == 2 and fragment in err and "Traceback" not in out + err, err[-2000:]
        assert not list(cwd.iterdir())
    with pytest.raises(ConfigCheckError, match=r"peft.dropout=1.0: must be a finite number >= 0 and < 1"):
        make_peft({"name": "vpt", "dropout": 1.0})


def test_source_tracing_counts_the_prompts_as_protected():
    from pyra_bench.models.merging import trace_sources

    model = build_model("vit_tiny_test", 5, "tome", [3, 2, 2], peft="vpt").eval()
    with trace_sources(model) as trace, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert trace.num_prefix == 11 and [b.tokens for b in trace.blocks] == [24, 22, 20]
    assert all(b.groups.shape == (2, 16) and (b.groups >= 11).all() for b in trace.blocks)  # patches only
