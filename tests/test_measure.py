"""Measurement instruments: MAC counts against the paper, counter agreement, throughput fields, bench CLI.

No timing assertions here (timings live in scripts/bench_speedup.py); throughput is only checked for its
fields and positivity.
"""

import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyra_bench.measure import (
    count_flops,
    flop_counter_count,
    fvcore_count,
    measure_model,
    measure_throughput,
    sdpa_macs,
    slugify,
)
from pyra_bench.models import build_model

ROOT = Path(__file__).resolve().parent.parent


@cache
def _built(backbone: str, method: str, schedule: str):
    torch.manual_seed(0)
    return build_model(backbone, 100, method, schedule, drop_path_rate=0.0)


@cache
def _flops(backbone: str, method: str, schedule: str):
    m = _built(backbone, method, schedule)
    return count_flops(m.pyra_method.inference_model(m))


@pytest.fixture(scope="module", autouse=True)
def _free_cached_models():
    yield
    _flops.cache_clear()
    _built.cache_clear()


def _close(value, target, rel=0.005):
    return abs(value - target) <= rel * target


# ---------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------
def test_vit_b16_unmerged_macs_match_the_paper():
    f = _flops("vit_b16_in21k", "peft", "none")
    assert _close(f["gmacs"], 17.56), f["gmacs"]
    assert _close(f["paper_gflops"], 16.37), f["paper_gflops"]  # Table 1: fvcore / 2**30
    # attention is counted: q@k^T + attn@v = 2 * H * N^2 * d per block
    assert f["gmacs_attention"] == pytest.approx(12 * 2 * 197 * 197 * 768 / 1e9, rel=1e-9)
    assert f["gmacs_fvcore_no_attention"] < f["gmacs"] - 0.7  # what plain fvcore would miss
    assert f["tokens_per_block"] == [197] * 12 and f["tokens_final"] == 197
    assert f["lora_merged"] and f["counter"].startswith("fvcore")


@pytest.mark.parametrize("method", ["tome", "pyra"])
@pytest.mark.parametrize("schedule,gmacs,final", [("low", 8.77, 11), ("high", 5.07, 5)])
def test_merged_vit_b16_macs_fall_to_the_paper_values(method, schedule, gmacs, final):
    f = _flops("vit_b16_in21k", method, schedule)
    assert _close(f["gmacs"], gmacs), f["gmacs"]
    assert f["tokens_final"] == final and f["tokens_per_block"][0] == 197
    # the jit trace reflects the reduced token counts: the MLP of each block sees fewer tokens
    assert f["tokens_mlp_per_block"] == f["tokens_per_block"][1:] + [final]
    assert all(a > b for a, b in zip(f["tokens_per_block"], f["tokens_mlp_per_block"]))


@pytest.mark.parametrize("method,schedule", [("peft", "none"), ("tome", "low"), ("pyra", "high")])
def test_counters_agree_within_one_percent(method, schedule):
    f = _flops("vit_b16_in21k", method, schedule)
    assert f["gmacs_flop_counter"] is not None and f["gmacs_analytic"] is not None
    assert f["max_disagreement"] < 0.01, f["disagreement"]


def test_paper_counted_merged_models_with_lora_unmerged():
    """The paper's 8.21 G / 4.75 G (low / high) are fvcore / 2**30 of the model with its LoRA branch unmerged."""
    for schedule, target in (("low", 8.21), ("high", 4.75)):
        f = measure_model(_built("vit_b16_in21k", "tome", schedule), params=False)["flops"]
        assert _close(f["paper_gflops_lora_unmerged"], target), (schedule, f["paper_gflops_lora_unmerged"])
        assert f["paper_gflops"] < f["paper_gflops_lora_unmerged"]  # deployable model: LoRA folded in


def test_fewer_tokens_fewer_macs():
    macs = []
    for r in ("none", "r1", "r2", "r4"):
        m = build_model("vit_tiny_test", 10, "tome" if r != "none" else "peft", r)
        f = count_flops(m.pyra_method.inference_model(m), image_size=32)
        macs.append(f["gmacs"])
        # (on this 48-wide model LayerNorm, which only fvcore counts, is ~2% of the MACs: no 1% agreement here)
        assert f["gmacs_flop_counter"] < f["gmacs"] and f["max_disagreement"] < 0.05
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == 4


class _Attn(nn.Module):
    """SDPA with v wider than q/k (d_v = 6, d = 4): q@k^T and attn@v are counted separately."""

    def forward(self, x):
        v = torch.cat([x, x[..., :2]], dim=-1)
        return F.scaled_dot_product_attention(x, x, v)


def test_sdpa_is_counted_by_both_counters():
    x = torch.randn(2, 3, 7, 4)  # (B, H, N, d)
    want = 2 * 3 * 7 * 7 * (4 + 6)
    assert sdpa_macs(x.shape, x.shape, (2, 3, 7, 6)) == want
    assert fvcore_count(_Attn(), x)["total"] == want
    assert flop_counter_count(_Attn(), x)["total"] == want  # the CPU SDPA kernel is registered


# ---------------------------------------------------------------------------------------------------------
# throughput
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_pyra():
    torch.manual_seed(0)
    return build_model("vit_tiny_test", 10, "pyra", "low", drop_path_rate=0.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_measure_throughput_fields(tiny_pyra, dtype):
    infer = tiny_pyra.pyra_method.inference_model(tiny_pyra)
    r = measure_throughput(infer, batch_size=4, image_size=32, device="cpu", dtype=dtype,
                           warmup_s=0.01, duration_s=0.05)
    assert r["img_per_s"] > 0 and r["img_per_s_median"] > 0
    assert r["iters"] >= 2 and r["warmup_iters"] >= 1 and r["timed_s"] > 0
    assert r["batch_size"] == 4 and r["image_size"] == 32 and r["dtype"] == dtype
    assert r["autocast"] == (dtype != "float32")
    assert r["device_type"] == "cpu" and isinstance(r["device"], str) and r["device"]
    assert r["threads"] >= 1 and r["versions"]["torch"] == torch.__version__
    assert r["lora_merged"] and "LoRA merged" in r["measured"]
    assert 0 < r["iter_time_s"]["min"] <= r["iter_time_s"]["median"] <= r["iter_time_s"]["max"]


def test_throughput_flags_unmerged_lora_and_rejects_cpu_fp16(tiny_pyra):
    r = measure_throughput(tiny_pyra, batch_size=2, image_size=32, warmup_s=0, duration_s=0.01)
    assert r["lora_merged"] is False and "UNMERGED" in r["measured"]
    with pytest.raises(ValueError, match="float16"):
        measure_throughput(tiny_pyra, batch_size=2, image_size=32, dtype="fp16", warmup_s=0, duration_s=0.01)
    with pytest.raises(ValueError, match="dtype"):
        measure_throughput(tiny_pyra, batch_size=2, image_size=32, dtype="int8", warmup_s=0, duration_s=0.01)


def test_measure_model_bundles_record_fields(tiny_pyra):
    before = {k: v.clone() for k, v in tiny_pyra.state_dict().items()}
    out = measure_model(tiny_pyra, 32, throughput=True,
                        throughput_kwargs=dict(batch_size=2, warmup_s=0, duration_s=0.02))
    assert out["params"]["trainable"] > 0 and out["params"]["paper_pct"] > 0
    assert out["flops"]["gmacs"] > 0 and out["flops"]["tokens_final"] == 17 - 4 - 3 - 2
    assert out["flops"]["paper_gflops_lora_unmerged"] > out["flops"]["paper_gflops"]
    assert out["throughput"]["img_per_s"] > 0 and out["throughput"]["lora_merged"]
    assert "LoRA merged" in out["measured"]
    # the built (trainable) model is untouched
    for k, v in tiny_pyra.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(p.requires_grad for p in tiny_pyra.parameters())


def test_slugify():
    assert slugify("NVIDIA GeForce RTX 3090") == "nvidia-geforce-rtx-3090"
    assert slugify("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz") == "intel-xeon-gold-6248"


# ---------------------------------------------------------------------------------------------------------
# the bench CLI
# ---------------------------------------------------------------------------------------------------------
def test_bench_cli_writes_a_record(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from pyra_bench.bench import run_bench

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("bench", overrides=[
            "backbone=vit_tiny_test", "method=pyra", "compression=low", "bench.batch_size=2",
            "bench.warmup_s=0", "bench.duration_s=0.02", f"bench.output_dir={tmp_path}"])
    rec = run_bench(cfg)
    files = list(tmp_path.glob("vit_tiny_test__pyra__low__*.json"))
    assert len(files) == 1 and "cpu" in files[0].name
    back = json.loads(files[0].read_text())
    assert back["kind"] == "bench" and back["method"] == "pyra" and back["schedule"] == "low"
    assert back["flops"]["gmacs"] > 0 and back["throughput"]["img_per_s"] > 0 and back["params"]["trainable"] > 0
    assert back["measured"].startswith("inference model") and rec["run_id"] == back["run_id"]
    out = capsys.readouterr().out
    assert "img/s" in out and "MACs" in out and str(files[0]) in out


def test_bench_builds_through_the_factory_every_backbone_train_accepts():
    """``bench`` builds as ``train`` does: a field override of a registered backbone (image size 48: a 6x6
    patch grid of the 8-pixel patches) and a backbone that only a config describes (its parameters: timm's
    own model of those arguments, head aside)."""
    import timm
    from hydra import compose, initialize_config_dir

    from pyra_bench.bench import build_for_bench

    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        larger = compose("bench", overrides=["backbone=vit_tiny_test", "backbone.image_size=48", "method=peft"])
        config_only = compose("bench", overrides=[
            "backbone=vit_tiny_test", "backbone.name=tiny_config_only", "+backbone.timm_name=vit_tiny_patch16_224",
            "backbone.lora_rank=2", "+backbone.kwargs={" + ",".join(f"{k}:{v}" for k, v in kwargs.items()) + "}",
            "method=tome", "compression=r2", "num_classes=10"])
    assert tuple(build_for_bench(larger).patch_embed.grid_size) == (6, 6)
    model = build_for_bench(config_only)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs)
    assert model.pyra_backbone.name == "tiny_config_only" and len(model.blocks) == 2
    assert model.pyra_backbone_params == sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("head."))
    assert list(model.pyra_method.schedule) == [2, 2]


def test_bench_cli_help_lists_groups():
    out = subprocess.run([sys.executable, "-m", "pyra_bench.bench", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backbone:" in out.stdout and "method:" in out.stdout and "\n  bench.device=cpu " in out.stdout
    assert "vit_b16_in21k" in out.stdout and "tome" in out.stdout


@pytest.mark.parametrize("method,compression", [("rap", "flops:0.6"), ("pyra", "low")])
def test_bench_measures_finished_runs_and_updates_their_records(tmp_path, method, compression):
    """bench.run: the exported model, rebuilt from its run's config alone, has the MACs the run recorded
    (RaP: a pruned structure); its throughput lands in the run record, where the tables read it."""
    from hydra import compose, initialize_config_dir

    from pyra_bench import tables
    from pyra_bench.bench import bench_runs
    from pyra_bench.errors import InputError
    from pyra_bench.records import iter_records
    from pyra_bench.train import train

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        tcfg = compose("train", overrides=[
            "task=digits", "backbone=vit_tiny_test", "trainer=smoke", "logger=csv", f"method={method}",
            f"compression={compression}", f"results_dir={tmp_path}/results", f"run_dir={tmp_path}/runs/{method}"])
        bcfg = compose("bench", overrides=[
            f"bench.run={tmp_path}/runs/*", "bench.batch_size=2", "bench.warmup_s=0", "bench.duration_s=0.02",
            f"bench.output_dir={tmp_path}/bench"])
        missing = compose("bench", overrides=[f"bench.run={tmp_path}/nowhere/*"])
    run = train(tcfg)
    assert run["throughput"] is None
    (bench,) = bench_runs(bcfg)
    assert bench["of_run"] == run["run_id"] and bench["flops"]["gmacs"] == run["flops"]["gmacs"]
    (updated,) = iter_records([tmp_path / "results"])
    assert updated["throughput"]["img_per_s"] > 0 and "bench.run" in updated["throughput"]["measured_by"]
    assert updated["metrics"] == run["metrics"]  # nothing else changed
    frame = tables.records_frame([updated])
    assert frame["throughput"].iloc[0] == updated["throughput"]["img_per_s"]
    with pytest.raises(InputError, match="no run folder matches"):
        bench_runs(missing)


def test_training_step_throughput_leaves_the_model_untouched():
    from pyra_bench.measure import measure_training_step

    model = build_model("vit_tiny_test", 10, "pyra", "low")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = measure_training_step(model, batch_size=4, image_size=32, warmup_s=0.0, duration_s=0.01)
    assert r["img_per_s"] > 0 and r["iters"] >= 2 and r["batch_size"] == 4
    assert r["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a copy was trained
    with pytest.raises(ValueError, match="float16 autocast is for CUDA"):
        measure_training_step(model, batch_size=2, image_size=32, dtype="float16")


@pytest.mark.parametrize("script", ["bench_speedup.py", "bench_training.py"])
def test_benchmark_scripts_run_in_quick_mode(script, tmp_path, capsys):
    """The benchmark scripts (timings are reported, never asserted) run end to end on the tiny ViT (their
    ``main``, in this process: the same code path as ``python scripts/<script> --quick``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_script_{script[:-3]}", ROOT / "scripts" / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.main(["--quick", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert isinstance(report, dict) and "peft" in out and "pyra" in out and "tome" in out
    if script == "bench_speedup.py":  # (bench_training writes its report only outside --quick)
        assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.md"))
        built = [{"method": m, "schedule": s} for m, s in [("peft", "none"), ("pyra", "low"), ("pyra", "high"),
                                                           ("rap", "low"), ("tome", "low"), ("tome", "high")]]
        order = [(c["method"], c["schedule"]) for c in mod._timing_order(built)]
        assert order == [("peft", "none"), ("tome", "low"), ("pyra", "low"), ("tome", "high"), ("pyra", "high"),
                         ("rap", "low")]  # PYRA's samples sit next to ToMe's at the same schedule


# ---------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------
def _modulating_tiny_pyra():
    """A tiny PYRA inference model whose modulation is not the identity (W_D != 0)."""
    torch.manual_seed(0)
    model = build_model("vit_tiny_test", 10, "pyra", "low", drop_path_rate=0.0)
    for m in model.modules():
        if hasattr(m, "w_d"):
            nn.init.normal_(m.w_d)
    return model.pyra_method.inference_model(model).eval()


def test_compiled_inference_model_agrees_with_eager():
    """Dynamo capture + AOTAutograd (backend aot_eager, no C++ build: seconds) of the merging model gives the
    eager logits; measure_throughput records the compilation."""
    from pyra_bench.measure import compile_model

    infer = _modulating_tiny_pyra()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        eager = infer(x)
        compiled = compile_model(infer, "aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert compile_model(infer, False) is infer
    r = measure_throughput(infer, batch_size=3, image_size=32, warmup_s=0, duration_s=0.01, compile="aot_eager")
    assert r["compiled"] == "aot_eager" and r["compile_s"] > 0 and r["img_per_s"] > 0


@pytest.mark.parametrize("method", ["tome", "pyra"])
def test_merging_models_compile_to_one_graph(method):
    """The merging forward traces as one graph (``fullgraph=True``): no graph break per block, which made
    ``torch.compile`` recompile for every block's token count and, past dynamo's recompile limit (8), run the
    later blocks eagerly. Backend ``eager`` (capture only, seconds); outputs equal the uncompiled model's."""
    torch.manual_seed(0)
    model = build_model("vit_tiny_test", 10, method, "low", drop_path_rate=0.0)
    infer = model.pyra_method.inference_model(model).eval()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.inference_mode():
        want = infer(x)
        got = torch.compile(infer, backend="eager", fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(os.environ.get("PYRA_TEST_INDUCTOR") != "1",
                    reason="inductor's cold C++ compile takes 1-4 minutes on 2 cores: set PYRA_TEST_INDUCTOR=1")
def test_inductor_compiled_inference_model_agrees_with_eager():
    import shutil as sh

    if not (sh.which(os.environ.get("CXX", "g++")) or sh.which("c++") or sh.which("clang++")):
        pytest.skip("no C++ compiler on this machine: torch.compile's inductor backend cannot run on the CPU")
    from pyra_bench.measure import compile_model

    infer = _modulating_tiny_pyra()
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        eager = infer(x)
        compiled = compile_model(infer, True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Pre-packed Linear weights (CPU inference) and the sandwiched timer (make bench)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not __import__("pyra_bench.models.prepack", fromlist=["x"]).prepack_available(),
                    reason="PyTorch without MKL: pre-packing does not apply")
def test_prepacked_linears_give_the_models_output_at_each_blocks_row_count():
    """Every Linear of a merging PYRA model (modulation not the identity) is packed for the rows it sees:
    batch x the tokens entering its block (qkv, proj) or leaving its merge (fc1, fc2), batch for the head --
    hand-derived from the schedule; the logits equal the unpacked model's (float64 reference), another batch
    size still gives the right logits, and the original model is untouched."""
    from pyra_bench.models.prepack import PrepackedLinear, prepack_linears
    from pyra_bench.models.schedules import token_counts

    infer = _modulating_tiny_pyra()
    before = {k: v.clone() for k, v in infer.state_dict().items()}
    x = torch.randn(3, 3, 32, 32)
    packed = prepack_linears(infer, x)
    assert not any(isinstance(m, PrepackedLinear) for m in infer.modules())
    assert not any(type(m) is nn.Linear for m in packed.modules())
    schedule = [blk.token_reducer.r if blk.token_reducer is not None else 0 for blk in infer.blocks]
    counts = token_counts(schedule, infer.patch_embed.num_patches + 1)
    assert counts[-1] < counts[0]  # the model merges
    for i, blk in enumerate(packed.blocks):
        assert blk.attn.qkv.rows == blk.attn.proj.rows == 3 * counts[i]
        assert blk.mlp.fc1.rows == blk.mlp.fc2.rows == 3 * counts[i + 1]
    assert packed.head.rows == 3
    reference = infer.double()
    with torch.inference_mode():
        want = reference(x.double())
        torch.testing.assert_close(packed(x).double(), want, rtol=1e-4, atol=1e-5)
        x5 = torch.randn(5, 3, 32, 32)
        torch.testing.assert_close(packed(x5).double(), reference(x5.double()), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k].double(), v) for k, v in infer.state_dict().items())


def test_sandwiched_timing_flanks_every_sample_with_the_reference(monkeypatch):
    """``ref, a, ref, b, ref, ...``: each sample's flank is the mean of the reference samples just before and
    after it. Hand-worked with a fake clock: balanced samples in the warm-up's proportions; then a machine
    that halves its speed after the first round leaves the ratio of every sample whose flanks both run at
    the new speed unchanged -- only the one sample straddling the step is off (3 instead of 4)."""
    from pyra_bench import measure

    clock, speed, order = [0.0], [1.0], []
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

    def call(name, seconds):
        def fn():
            order.append(name)
            clock[0] += seconds / speed[0]
        return fn

    fns = {"ref": call("ref", 1.0), "a": call("a", 0.5), "b": call("b", 0.25)}
    times, flanks = measure.time_sandwiched(fns, "ref", "cpu", duration_s=0.0, min_rounds=1, warmup_rounds=1)
    assert order == ["ref", "a", "b"] + ["ref", "a", "a", "ref", "b", "b", "b", "b", "ref"]  # warm-up, balanced
    assert times == {"ref": [1.0] * 3, "a": [0.5], "b": [0.25]} and flanks == {"a": [1.0], "b": [1.0]}

    order.clear()
    fns["ref"] = call("ref", 1.0)

    def slowing(name, seconds):  # the machine halves its speed after the first round's last reference sample
        inner = call(name, seconds)

        def fn():
            inner()
            if order.count("ref") == 3 + 1:  # warm-up ref, then three flanking refs of round 1 (a, b, ...)
                speed[0] = 0.5
        return fn

    fns = {"ref": slowing("ref", 1.0), "a": call("a", 0.5), "b": call("b", 0.25)}
    times, flanks = measure.time_sandwiched(fns, "ref", "cpu", duration_s=0.0, min_rounds=2, warmup_rounds=1,
                                            balance=False)
    ratios = {k: [f / t for f, t in zip(flanks[k], times[k])] for k in flanks}
    assert times["a"] == [0.5, 1.0] and times["b"] == [0.25, 0.5]  # the machine did slow down
    # round 1: ref a ref b ref | speed halves | round 2 (rotated): b ref a ref -> b's flanks are 1.0 and 2.0
    assert ratios == {"a": [2.0, 2.0], "b": [4.0, 3.0]}
    with pytest.raises(ValueError, match="reference 'x' is not one of the calls"):
        measure.time_sandwiched(fns, "x", "cpu", duration_s=0.0)
    with pytest.raises(ValueError, match="warm-up round"):
        measure.time_sandwiched(fns, "ref", "cpu", duration_s=0.0, warmup_rounds=0, balance=True)


def test_time_sandwiched_times_with_the_given_clock():
    """``clock=`` replaces wall time in every sample (e.g. ``time.process_time``); the default stays wall time."""
    from pyra_bench import measure

    ticks = [0.0]

    def clock():
        return ticks[0]

    def call(seconds):
        def fn():
            ticks[0] += seconds
        return fn

    times, flanks = measure.time_sandwiched({"ref": call(2.0), "a": call(1.0)}, "ref", "cpu", duration_s=0.0,
                                            min_rounds=2, warmup_rounds=1, balance=False, clock=clock)
    assert times == {"ref": [2.0] * 3, "a": [1.0] * 2} and flanks == {"a": [2.0, 2.0]}
