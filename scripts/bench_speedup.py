#!/usr/bin/env python
"""Speedup of token merging over the unmerged backbone, on one device, with FLOPs for reference.

For each backbone (ViT-B/16; ViT-L/16 too with ``--device cuda``) it builds the unmerged model (``peft``)
and every registered token-reducing method at each schedule (``low``/``high``), measures the *inference
model* (LoRA merged into qkv) of each -- MACs with fvcore (+ explicit attention), images/s with the
authors' protocol (:func:`pyra_bench.measure.measure_throughput`) -- and reports:

* img/s (median over interleaved repeats; the configs are measured round-robin, rotating the order every
  repeat, so slow drift of the machine affects every config alike),
* speedup vs the unmerged model (median of the per-repeat ratios),
* MACs ratio and speedup / (1 / MACs ratio): the fraction of the FLOPs reduction that turns into speed
  (target >= 90 %),
* PYRA's throughput relative to ToMe at the same schedule (target: within 3 %).

Diagnostics (``--diagnostics``; ``--repeats 0 --diagnostics`` for diagnostics alone): time per component (attention, merge, PYRA modulation,
MLP, ...) from module hooks, the top operators from ``torch.profiler``, SDPA with / without the additive
proportional-attention bias, and prototypes of alternative merge implementations (for the lead: changes
to ``pyra_bench/models/merging.py`` are proposed, not made, here).

Writes ``results/bench/speedup_<device-slug>.md`` and ``.json``.

    python scripts/bench_speedup.py                       # CPU defaults: batch 16, 5 s warm-up, 10 s timing, 3 repeats
    python scripts/bench_speedup.py --device cuda         # batch 512, 10 s + 10 s, ViT-B and ViT-L
    python scripts/bench_speedup.py --quick               # a smoke run (tiny model, ~20 s)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's start/stop chatter
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pyra_bench.measure import (  # noqa: E402
    MEASURED_MODEL,
    count_flops,
    device_name,
    device_slug,
    input_spec,
    measure_throughput,
    software_versions,
)
from pyra_bench.methods import METHODS  # noqa: E402
from pyra_bench.models import build_model  # noqa: E402
from pyra_bench.models.macs import BUDGETS  # noqa: E402
from pyra_bench.records import atomic_write_json  # noqa: E402

BASELINE = ("peft", "none")
TARGET_EFFICIENCY = 0.90
TARGET_PYRA_VS_TOME = 0.03


# ---------------------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------------------
def build_inference(backbone: str, method: str, schedule: str, num_classes: int = 100, advance_stages: bool = False):
    """The inference model (LoRA merged) of a freshly built model. With ``advance_stages`` the method's
    stages are entered in order without data and without training (``on_stage_start(stage, model, None)``),
    which gives the deployed *structure* of multi-stage methods whose structure is fixed by the budget
    (e.g. SPViT's selectors with fixed keep counts); a method that needs data there raises, and is skipped."""
    torch.manual_seed(0)
    model = build_model(backbone, num_classes, method, schedule, drop_path_rate=0.0)
    m = model.pyra_method
    stages = [s.name for s in m.stages()]
    if advance_stages:
        for st in m.stages():
            m.on_stage_start(st, model, None)
    return m.inference_model(model).eval(), stages


def build_configs(backbone: str, methods: list[str], schedules: list[str], log) -> tuple[list[dict], list[dict]]:
    """Build the unmerged baseline and every (method, schedule); skip, with a note, what cannot be measured."""
    configs, skipped = [], []
    model, _ = build_inference(backbone, *BASELINE)
    flops = count_flops(model, image_size=None)
    base_macs = flops["gmacs"]
    configs.append({"backbone": backbone, "method": BASELINE[0], "schedule": BASELINE[1], "model": model, "flops": flops})
    log(f"  {backbone} {BASELINE[0]:>8} {BASELINE[1]:<5} {flops['gmacs']:.3f} GMACs, {flops['tokens_final']} tokens out")
    for method in methods:
        if method == BASELINE[0]:
            continue
        for sch in schedules:
            try:
                model, stages = build_inference(backbone, method, sch)
            except Exception as e:  # noqa: BLE001 - report, do not abort the whole benchmark
                skipped.append({"backbone": backbone, "method": method, "schedule": sch,
                                "reason": f"cannot be built without data/training: {type(e).__name__}: {e}"})
                log(f"  skip {method} {sch}: {type(e).__name__}: {e}")
                continue
            flops = count_flops(model, image_size=None)
            note = None
            if flops["gmacs"] >= 0.99 * base_macs and len(stages) > 1:
                # not compressed as built: enter its stages without data / training to reach the deployed structure
                try:
                    model, _ = build_inference(backbone, method, sch, advance_stages=True)
                    flops = count_flops(model, image_size=None)
                    note = (f"structure reached by entering its stages {stages} without data or training "
                            f"(untrained method parameters; the structure -- token counts, kept channels -- is fixed by the budget)")
                except Exception as e:  # noqa: BLE001
                    note = f"entering its stages without data failed: {type(e).__name__}: {e}"
            budget = BUDGETS.get(sch)
            if note and budget is not None and abs(flops["gmacs"] / base_macs - budget) > 0.05:
                skipped.append({"backbone": backbone, "method": method, "schedule": sch,
                                "reason": f"its structure comes from a search that needs data: entered without data it "
                                          f"keeps {flops['gmacs'] / base_macs:.3f} of the MACs, not the budget {budget}"})
                log(f"  skip {method} {sch}: structure needs a data-driven search (stages {stages})")
                continue
            if flops["gmacs"] >= 0.99 * base_macs:
                skipped.append({"backbone": backbone, "method": method, "schedule": sch,
                                "reason": f"not compressed when built (stages {stages}): its structure comes from a "
                                          f"search/training stage that needs data" + (f"; {note}" if note else "")})
                log(f"  skip {method} {sch}: not compressed at build time (stages {stages})")
                continue
            configs.append({"backbone": backbone, "method": method, "schedule": sch, "model": model, "flops": flops,
                            "stages": stages, "note": note})
            if note:
                log(f"  note {method} {sch}: {note}")
            log(f"  {backbone} {method:>8} {sch:<5} {flops['gmacs']:.3f} GMACs, {flops['tokens_final']} tokens out")
    return configs, skipped


# ---------------------------------------------------------------------------------------------------------
# interleaved timing
# ---------------------------------------------------------------------------------------------------------
def machine_probe(device, n: int = 1024, seconds: float = 0.3) -> float:
    """GFLOP/s of a fixed float32 GEMM: a speed reference taken before every measurement, to expose
    throttling or drift of the machine (shared / burstable CPUs, GPU clocks)."""
    dev = torch.device(device)
    a, b = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    out = torch.empty(n, n, device=dev)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.1:  # warm the probe itself (first calls are slow)
        torch.mm(a, b, out=out)
    _sync(dev)
    iters, t0 = 0, time.perf_counter()
    while iters < 3 or time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=out)
        iters += 1
    _sync(dev)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e9


CLEAN_PROBE_FRACTION = 0.85  # a run is "clean" when the GEMM probes around it reach 85% of the machine's speed


def _measure(c: dict, tkw: dict[str, Any], label: str, log) -> None:
    before = machine_probe(tkw["device"])
    r = measure_throughput(c["model"], **tkw)
    r["probe_gflops"] = before
    r["probe_gflops_after"] = machine_probe(tkw["device"])
    c["runs"].append(r)
    log(f"  {label}  {c['backbone']} {c['method']:>8} {c['schedule']:<5} {r['img_per_s']:9.2f} img/s  "
        f"({r['iters']} iters, {r['timed_s']:.1f} s; GEMM probe {before:.0f} / {r['probe_gflops_after']:.0f} GFLOP/s)")


def mark_clean(configs: list[dict]) -> float:
    """Flag each run clean / throttled against the machine's reference speed (upper-half median of all probes)."""
    probes = sorted(p for c in configs for r in c["runs"] for p in (r["probe_gflops"], r["probe_gflops_after"]))
    ref = statistics.median(probes[len(probes) // 2:])
    for c in configs:
        for r in c["runs"]:
            r["clean"] = min(r["probe_gflops"], r["probe_gflops_after"]) >= CLEAN_PROBE_FRACTION * ref
    return ref


def run_interleaved(configs: list[dict], repeats: int, tkw: dict[str, Any], log, extra_rounds: int = 2) -> float:
    """``repeats`` round-robin rounds (order rotated every round), each measurement bracketed by GEMM probes;
    then up to ``extra_rounds`` more rounds for the configs with fewer than ``min(2, repeats)`` clean runs
    (the machine was throttled while they ran). Returns the machine's reference GEMM speed."""
    for c in configs:
        c["runs"] = []
    n = len(configs)
    for rep in range(repeats):
        for c in [configs[(i + rep) % n] for i in range(n)]:
            _measure(c, tkw, f"repeat {rep + 1}/{repeats}", log)
    ref = mark_clean(configs)
    need = min(2, repeats)
    for extra in range(extra_rounds):
        short = [c for c in configs if sum(r["clean"] for r in c["runs"]) < need]
        if not short:
            break
        log(f"  {len(short)} config(s) with < {need} clean runs (machine throttled); extra round {extra + 1}/{extra_rounds}")
        for c in short:
            _measure(c, tkw, f"extra {extra + 1}/{extra_rounds}", log)
        ref = mark_clean(configs)
    return ref


def summarise(configs: list[dict]) -> list[dict]:
    """img/s = median over the clean runs (all runs if none is clean, flagged); speedups and PYRA-vs-ToMe are
    ratios of those medians."""
    def med(c):
        clean = [r["img_per_s"] for r in c["runs"] if r.get("clean", True)]
        return statistics.median(clean or [r["img_per_s"] for r in c["runs"]]), len(clean)

    rows = []
    by_key = {(c["backbone"], c["method"], c["schedule"]): c for c in configs}
    for c in configs:
        base = by_key[(c["backbone"], *BASELINE)]
        ips, n_clean = med(c)
        base_ips, _ = med(base)
        ips_all = [r["img_per_s"] for r in c["runs"]]
        clean_runs = [r["img_per_s"] for r in c["runs"] if r.get("clean", True)] or ips_all
        macs_ratio = c["flops"]["gmacs"] / base["flops"]["gmacs"]
        speedup = ips / base_ips
        row = {
            "backbone": c["backbone"], "method": c["method"], "schedule": c["schedule"],
            "tokens_final": c["flops"]["tokens_final"], "tokens_per_block": c["flops"]["tokens_per_block"],
            "gmacs": c["flops"]["gmacs"], "paper_gflops": c["flops"]["paper_gflops"],
            "gmacs_flop_counter": c["flops"]["gmacs_flop_counter"], "gmacs_analytic": c["flops"]["gmacs_analytic"],
            "macs_ratio": macs_ratio,
            "img_per_s": ips, "img_per_s_runs": ips_all, "clean_runs": [r.get("clean", True) for r in c["runs"]],
            "n_clean": n_clean, "img_per_s_min": min(clean_runs), "img_per_s_max": max(clean_runs),
            "speedup": speedup,
            "ideal_speedup": 1 / macs_ratio,
            "efficiency": speedup * macs_ratio,  # speedup / (1 / MACs ratio)
            "vs_tome": None, "pyra_vs_tome": None,
            "probe_gflops_runs": [r["probe_gflops"] for r in c["runs"]],
            "probe_gflops_after_runs": [r["probe_gflops_after"] for r in c["runs"]],
            "note": c.get("note"),
        }
        if c["method"] not in ("tome", BASELINE[0]) and (c["backbone"], "tome", c["schedule"]) in by_key:
            row["vs_tome"] = ips / med(by_key[(c["backbone"], "tome", c["schedule"])])[0]
            if c["method"] == "pyra":
                row["pyra_vs_tome"] = row["vs_tome"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# diagnostics: where the time goes, and prototypes of fixes
# ---------------------------------------------------------------------------------------------------------
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def component_times(model, x, device, iters: int = 2) -> dict[str, float]:
    """Seconds per forward spent in each component, from pre/post forward hooks (with device sync)."""
    acc: dict[str, float] = {}
    start: dict[int, float] = {}
    handles = []

    def add(mod, name):
        def pre(m, args):
            _sync(device)
            start[id(m)] = time.perf_counter()

        def post(m, args, out):
            _sync(device)
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - start.pop(id(m))

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))

    add(model.patch_embed, "patch_embed")
    for blk in model.blocks:
        add(blk.norm1, "norm1+norm2")
        add(blk.norm2, "norm1+norm2")
        add(blk.attn, "attention (qkv, SDPA, proj)")
        add(blk.mlp, "mlp")
        red = getattr(blk, "token_reducer", None)
        if red is not None:
            add(red, "token reduction (total)")
            if getattr(red, "modulator", None) is not None:
                add(red.modulator, "PYRA modulation")
    add(model, "whole forward")
    try:
        with torch.inference_mode():
            model(x)
            acc.clear()
            for _ in range(iters):
                model(x)
    finally:
        for h in handles:
            h.remove()
    out = {k: v / iters for k, v in acc.items()}
    total = out.get("whole forward", float("nan"))
    if "token reduction (total)" in out:
        out["token merging (matching + gather/scatter)"] = out["token reduction (total)"] - out.get("PYRA modulation", 0.0)
    named = sum(v for k, v in out.items() if k not in ("whole forward", "token reduction (total)"))
    out["other (residual adds, head, pos-embed, hooks)"] = total - named
    return out


def profile_ops(model, x, device, top: int = 12) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with torch.inference_mode():
        model(x)
        _sync(device)
        with profile(activities=acts) as prof:
            model(x)
            _sync(device)
    key = "self_device_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    evs = sorted(prof.key_averages(), key=lambda e: -getattr(e, key, 0))
    total = sum(getattr(e, key, 0) for e in evs) or 1
    return [{"op": e.key, "ms": getattr(e, key, 0) / 1e3, "pct": 100 * getattr(e, key, 0) / total, "calls": e.count}
            for e in evs[:top]]


def _time_fn(fn, device, min_s: float = 1.0, min_iters: int = 5) -> float:
    with torch.inference_mode():
        fn()
        _sync(device)
        n, t0 = 0, time.perf_counter()
        while n < min_iters or time.perf_counter() - t0 < min_s:
            fn()
            n += 1
        _sync(device)
    return (time.perf_counter() - t0) / n


def sdpa_mask_bench(batch, heads, n, d, device, dtype=torch.float32, rounds: int = 3) -> dict[str, float]:
    """ms per SDPA call at one block's shape, per kernel (auto = PyTorch's choice, then each backend pinned),
    with no mask (the unmerged model) and with the additive (B,1,1,N) ``log(size)`` bias of proportional
    attention (merged models); ``math`` is what a non-fused attention (timm 0.5.4, the authors') costs.
    Combinations a kernel does not support are left out. Minimum over ``rounds`` interleaved rounds."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, d, generator=g).to(device, dtype) for _ in range(3))
    bias = torch.zeros(batch, 1, 1, n, device=device, dtype=dtype)
    backends = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}
    if torch.device(device).type == "cuda":
        backends["efficient"] = SDPBackend.EFFICIENT_ATTENTION
        backends["cudnn"] = SDPBackend.CUDNN_ATTENTION
    res: dict[str, float] = {}
    unsupported = set()
    for _ in range(rounds):  # interleaved rounds, minimum per combination (robust to machine drift)
        for bname, backend in backends.items():
            for mname, mask in (("no_mask", None), ("bias", bias)):
                key = f"{bname}/{mname}"
                if key in unsupported:
                    continue
                ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
                try:
                    with ctx, warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        t = 1e3 * _time_fn(
                            lambda mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), device, 0.3, 3)
                except RuntimeError:
                    unsupported.add(key)  # this kernel does not take this input
                    continue
                res[key] = min(res.get(key, float("inf")), t)
    return res


def _forward_features_with_unit_sizes(self, x, attn_mask=None, is_causal=False):
    """The unmerged model, but every block gets sizes = 1, i.e. an all-zero log(size) bias in SDPA."""
    x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
    size = x.new_ones(x.shape[0], x.shape[1], 1)
    for blk in self.blocks:
        x, size = blk(x, size)
    return self.norm(x)


# Prototype of a leaner merge (same result as pyra_bench.models.merging.merge_wavg; see the report).
def merge_wavg_lean(x, size, m, modulator=None, distill_token=False):
    B, N, D = x.shape
    r = m.src_idx.shape[1]
    xw = x if size is None else x * size
    src, dst = xw[:, ::2], xw[:, 1::2]
    n_unm = m.unm_idx.shape[1]
    unm = src.gather(1, m.unm_idx.expand(B, n_unm, D))
    s = src.gather(1, m.src_idx.expand(B, r, D))
    if modulator is not None:
        t = dst.gather(1, m.dst_idx.expand(B, r, D))
        s = modulator(s, t)
    dst = dst.scatter_add(1, m.dst_idx.expand(B, r, D), s)
    if size is None:
        size = x.new_ones(B, N, 1)
    ssrc, sdst = size[:, ::2], size[:, 1::2]
    sunm = ssrc.gather(1, m.unm_idx)
    sdst = sdst.scatter_add(1, m.dst_idx, ssrc.gather(1, m.src_idx))
    if distill_token:
        out = torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        size = torch.cat([sunm[:, :1], sdst[:, :1], sunm[:, 1:], sdst[:, 1:]], dim=1)
    else:
        out = torch.cat([unm, dst], dim=1)
        size = torch.cat([sunm, sdst], dim=1)
    return out / size, size


def merge_prototypes(model, x, device) -> dict[str, Any]:
    """Time the current merge vs the lean prototype on the real per-block inputs of ``model``."""
    from pyra_bench.models import merging

    captured = []
    hooks = []
    for blk in model.blocks:
        red = getattr(blk, "token_reducer", None)
        if red is not None:
            hooks.append(red.register_forward_pre_hook(
                lambda m, args: captured.append((m, args[0].clone(), None if args[1] is None else args[1].clone(),
                                                 args[3].clone()))))
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    cur = lean = 0.0
    max_err = 0.0
    for red, xb, size, k in captured:
        r = min(red.r, merging.max_merge(xb.shape[1], red.num_protected))
        with torch.inference_mode():
            mt = merging.bipartite_matching(k.mean(dim=1), r, red.class_token, red.distill_token)
            a = merging.merge_wavg(xb, size, mt, red.modulator, red.distill_token)
            b = merge_wavg_lean(xb, size, mt, red.modulator, red.distill_token)
        max_err = max(max_err, (a[0] - b[0]).abs().max().item(), (a[1] - b[1]).abs().max().item())
        args = (xb, size, mt, red.modulator, red.distill_token)
        cur += _time_fn(lambda args=args: merging.merge_wavg(*args), device, 0.2, 3)
        lean += _time_fn(lambda args=args: merge_wavg_lean(*args), device, 0.2, 3)
    return {"merge_wavg_ms_per_forward": 1e3 * cur, "lean_prototype_ms_per_forward": 1e3 * lean,
            "max_abs_difference": max_err, "blocks": len(captured)}


def diagnostics(configs: list[dict], tkw: dict[str, Any], log, diag_schedule: str = "high") -> dict[str, Any]:
    """Where the time goes: the baseline and every method at ``diag_schedule``."""
    device = tkw["device"]
    bs = tkw["batch_size"]
    out: dict[str, Any] = {"components_s_per_forward": {}, "top_ops": {}, "merge_prototype": {}}
    for c in configs:
        m = c["model"]
        ch, size = input_spec(m)
        x = torch.randn(bs, ch, size, size, device=device)
        key = f"{c['backbone']}/{c['method']}/{c['schedule']}"
        if c["method"] != BASELINE[0] and c["schedule"] != diag_schedule:
            continue
        out["components_s_per_forward"][key] = component_times(m, x, device)
        out["top_ops"][key] = profile_ops(m, x, device)
        if any(getattr(getattr(b, "token_reducer", None), "r", None) for b in m.blocks):  # ToMe-style merging
            out["merge_prototype"][key] = merge_prototypes(m, x, device)
        log(f"  diagnostics {key} done")
    base = next(c for c in configs if c["method"] == BASELINE[0])
    blk = base["model"].blocks[0].attn
    n = base["flops"]["tokens_per_block"][0]
    out["sdpa_ms_per_call"] = sdpa_mask_bench(bs, blk.num_heads, n, blk.head_dim, device)
    log("  SDPA mask micro-benchmark done")
    # the whole unmerged model with / without an (all-zero) additive bias in every block
    m2 = copy.deepcopy(base["model"])
    m2.forward_features = types.MethodType(_forward_features_with_unit_sizes, m2)
    ab = {"no_bias": [], "zero_bias": []}
    for _ in range(1):
        ab["no_bias"].append(measure_throughput(base["model"], **{**tkw, "warmup_s": 1, "duration_s": tkw["duration_s"] / 2})["img_per_s"])
        ab["zero_bias"].append(measure_throughput(m2, **{**tkw, "warmup_s": 1, "duration_s": tkw["duration_s"] / 2})["img_per_s"])
    out["unmerged_with_bias_img_per_s"] = {k: statistics.median(v) for k, v in ab.items()}
    out["unmerged_with_bias_img_per_s"]["runs"] = ab
    log("  unmerged model with/without additive bias done")
    return out


# ---------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------
def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    timed = bool(report["results"]) and "img_per_s" in report["results"][0]
    mp = report.get("machine_probe_gflops") or {}
    L = [f"# Token-merging speedup on {report['device']}", ""]
    if not timed:
        L += [f"Diagnostics only (no throughput table). Measured: {MEASURED_MODEL}. Batch {s['batch_size']}, "
              f"{s['dtype']}, {s['threads']} threads, torch {report['versions']['torch']}. Wall time "
              f"{report['wall_time_s']:.0f} s.", ""]
    else:
        L += [
             f"Measured: {MEASURED_MODEL}. Random-init weights (values do not change MACs or time). "
             f"Protocol: eval, `torch.inference_mode`, random input, batch {s['batch_size']}, {s['dtype']}, "
             f"{s['warmup_s']} s wall-clock warm-up + {s['duration_s']} s of timed whole forwards (device sync after each), "
             f"{s['repeats']} interleaved repeats (order rotated every repeat). MACs: fvcore + explicit SDPA handle, per image. "
             f"Attention kernel: {s.get('sdpa_backend') or 'auto (PyTorch SDPA dispatch)'}. "
             f"torch {report['versions']['torch']}, timm {report['versions']['timm']}, {s['threads']} threads. "
             f"Wall time {report['wall_time_s']:.0f} s.", "",
             f"Machine-speed probe: a float32 GEMM before and after every measurement; reference speed "
             f"{mp['reference']:.0f} GFLOP/s (range {mp['min']:.0f}-{mp['max']:.0f}). Runs with a probe below "
             f"{100 * mp['clean_threshold']:.0f}% of the reference were taken while the machine was throttled and are "
             f"excluded from the medians ({mp['throttled_runs_excluded']} of {mp['runs']} runs; configs short of clean "
             f"runs got extra rounds). img/s = median of the clean runs [min-max of the clean runs]; speedup and "
             f"vs-ToMe = ratios of those medians.", "",
             "| backbone | method | schedule | tokens out | GMACs | MACs ratio | img/s (median [min-max]) | speedup | "
             "1/MACs ratio | speedup / (1/MACs ratio) | vs ToMe |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"] if timed else []:
        eff = "-" if r["method"] == BASELINE[0] else (
            f"{100 * r['efficiency']:.0f}% {'OK' if r['efficiency'] >= TARGET_EFFICIENCY else 'MISSED'}")
        vt = r.get("vs_tome")
        vts = "-" if vt is None else f"{vt:.3f} {'OK' if abs(1 - vt) <= TARGET_PYRA_VS_TOME or vt > 1 else 'MISSED'}"
        nc = f" ({r['n_clean']}/{len(r['img_per_s_runs'])} clean)" if r["n_clean"] < len(r["img_per_s_runs"]) else ""
        L.append(f"| {r['backbone']} | {r['method']} | {r['schedule']} | {r['tokens_final']} | {r['gmacs']:.2f} | "
                 f"{r['macs_ratio']:.3f} | {r['img_per_s']:.2f} [{r['img_per_s_min']:.2f}-{r['img_per_s_max']:.2f}]{nc} | "
                 f"{r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | {eff} | {vts} |")
    notes = [f"- {r['backbone']} {r['method']} {r['schedule']}: {r['note']}" for r in report["results"] if r.get("note")]
    if notes:
        L += ["", "Notes:", ""] + notes
    L += ["", f"Targets: speedup / (1/MACs ratio) >= {100 * TARGET_EFFICIENCY:.0f}%; PYRA within "
              f"{100 * TARGET_PYRA_VS_TOME:.0f}% of ToMe at the same schedule (faster counts as met).", ""]
    if report["skipped"]:
        L += ["Skipped:", ""] + [f"- {k['backbone']} {k['method']} {k['schedule']}: {k['reason']}" for k in report["skipped"]] + [""]
    for bb, d in (report.get("diagnostics") or {}).items():
        L += [f"## Diagnostics: {bb}", "", "### Time per component (ms per forward, module hooks with device sync)", ""]
        comps = d["components_s_per_forward"]
        keys = list(comps)
        names = ["patch_embed", "attention (qkv, SDPA, proj)", "norm1+norm2", "token merging (matching + gather/scatter)",
                 "PYRA modulation", "mlp", "other (residual adds, head, pos-embed, hooks)", "whole forward"]
        L += ["| component | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for nme in names:
            cells = []
            for k in keys:
                v = comps[k].get(nme)
                tot = comps[k].get("whole forward") or 1
                cells.append("-" if v is None else f"{1e3 * v:.1f} ({100 * v / tot:.1f}%)")
            L.append(f"| {nme} | " + " | ".join(cells) + " |")
        L += ["", "### Top operators (torch.profiler, self time of one forward)", ""]
        for k, ops in d["top_ops"].items():
            L.append(f"- **{k}**: " + ", ".join(f"`{o['op']}` {o['pct']:.1f}%" for o in ops[:8]))
        sd = d["sdpa_ms_per_call"]
        L += ["", "### SDPA, one call at the first block's shape (ms; kernel / mask)", "",
              ", ".join(f"{k} {v:.2f}" for k, v in sd.items()), ""]
        ub = d["unmerged_with_bias_img_per_s"]
        L += [f"Unmerged model, img/s: no bias {ub['no_bias']:.2f} vs an all-zero additive bias in every block "
              f"{ub['zero_bias']:.2f} ({100 * (ub['zero_bias'] / ub['no_bias'] - 1):+.1f}%).", ""]
        if d["merge_prototype"]:
            L += ["### Merge implementation: current `merge_wavg` vs a lean prototype (same result)", "",
                  "| model | current (ms/forward) | prototype (ms/forward) | max abs diff |", "|---|---:|---:|---:|"]
            for k, v in d["merge_prototype"].items():
                L.append(f"| {k} | {v['merge_wavg_ms_per_forward']:.2f} | {v['lean_prototype_ms_per_forward']:.2f} | "
                         f"{v['max_abs_difference']:.1e} |")
            L.append("")
    return "\n".join(L) + "\n"


def print_table(report):
    print()
    print(markdown(report).split("## Diagnostics")[0])


# ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Defaults depend on --device: cpu = batch 16, 5 s warm-up, 10 s timing, 3 repeats, "
                                       "ViT-B only; cuda = batch 512, 10 s + 10 s (the paper's protocol), ViT-B and ViT-L.")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<i>")
    p.add_argument("--dtype", default="float32", help="float32 (the paper) | bfloat16 | float16 (autocast)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warmup-s", type=float, default=None)
    p.add_argument("--duration-s", type=float, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--extra-rounds", type=int, default=2,
                   help="extra rounds for configs whose runs were taken while the machine was throttled")
    p.add_argument("--backbones", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--schedules", nargs="+", default=["low", "high"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--sdpa-backend", default=None, choices=["auto", "flash", "efficient", "math", "cudnn"],
                   help="pin the attention kernel for every model (fair comparison: same kernel merged and unmerged)")
    p.add_argument("--diagnostics", action="store_true",
                   help="also profile where the time goes (component times, top ops, SDPA kernels/masks, merge "
                        "prototypes); with --repeats 0 only the diagnostics run (output *_diagnostics.md/json)")
    p.add_argument("--out-dir", default=str(ROOT / "results" / "bench"))
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--quick", action="store_true", help="smoke run: vit_tiny_test, tiny durations")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.device(a.device).type == "cuda"
    if a.quick:
        a.backbones = a.backbones or ["vit_tiny_test"]
        a.batch_size = a.batch_size or 8
        a.warmup_s = 0.2 if a.warmup_s is None else a.warmup_s
        a.duration_s = 0.3 if a.duration_s is None else a.duration_s
        a.repeats = min(a.repeats, 2)
    backbones = a.backbones or (["vit_b16_in21k", "vit_l16_in21k"] if cuda else ["vit_b16_in21k"])
    tkw = {"batch_size": a.batch_size or (512 if cuda else 16), "device": a.device, "dtype": a.dtype,
           "warmup_s": a.warmup_s if a.warmup_s is not None else (10.0 if cuda else 5.0),
           "duration_s": a.duration_s if a.duration_s is not None else 10.0,
           "channels_last": a.channels_last, "image_size": None, "sdpa_backend": a.sdpa_backend}
    methods = a.methods or METHODS.names()
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    log(f"device {device_name(a.device)}; methods {methods}; schedules {a.schedules}; "
        f"batch {tkw['batch_size']}, warm-up {tkw['warmup_s']} s, timing {tkw['duration_s']} s, {a.repeats} repeats")
    results, skipped, diags, refs = [], [], {}, {}
    for bb in backbones:
        log(f"building {bb}")
        configs, sk = build_configs(bb, methods, a.schedules, log)
        skipped += sk
        for c in configs:
            c["model"].to(a.device)
        if a.repeats > 0:
            refs[bb] = run_interleaved(configs, a.repeats, tkw, log, a.extra_rounds)
            results += summarise(configs)
        else:
            results += [{"backbone": c["backbone"], "method": c["method"], "schedule": c["schedule"],
                         "gmacs": c["flops"]["gmacs"], "tokens_final": c["flops"]["tokens_final"],
                         "note": c.get("note")} for c in configs]
        if a.diagnostics:
            diags[bb] = diagnostics(configs, tkw, log, a.schedules[-1])
        for c in configs:
            c["model"] = None
        if cuda:
            torch.cuda.empty_cache()
    report = {
        "kind": "bench_speedup",
        "device": device_name(a.device), "device_slug": device_slug(a.device),
        "measured": MEASURED_MODEL,
        "settings": {**{k: v for k, v in tkw.items() if k != "image_size"}, "repeats": a.repeats,
                     "threads": torch.get_num_threads(), "backbones": backbones, "methods": methods,
                     "schedules": a.schedules},
        "targets": {"efficiency_min": TARGET_EFFICIENCY, "pyra_vs_tome_tolerance": TARGET_PYRA_VS_TOME},
        "results": results, "skipped": skipped,
        "diagnostics": diags or None,  # per backbone
        "versions": software_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_time_s": time.time() - t0,
    }
    probes = [p for r in results for p in r.get("probe_gflops_runs", []) + r.get("probe_gflops_after_runs", [])]
    n_runs = sum(len(r.get("clean_runs", [])) for r in results)
    n_throttled = sum(not x for r in results for x in r.get("clean_runs", []))
    report["machine_probe_gflops"] = {
        "min": min(probes), "max": max(probes), "reference": statistics.median(list(refs.values())),
        "clean_threshold": CLEAN_PROBE_FRACTION, "runs": n_runs, "throttled_runs_excluded": n_throttled,
    } if probes else None
    if n_throttled:
        log(f"NOTE: {n_throttled} of {n_runs} runs were taken while the machine was throttled (GEMM probe < "
            f"{100 * CLEAN_PROBE_FRACTION:.0f}% of its reference speed) and are excluded from the medians. "
            f"On a burstable VM try --threads 1.")
    if any(r.get("n_clean") == 0 for r in results):
        log("WARNING: some configs have no clean run; their numbers are unreliable")
    out = Path(a.out_dir)
    stem = (f"speedup_{report['device_slug']}{('_' + a.tag) if a.tag else ''}"
            f"{'_diagnostics' if a.repeats == 0 else ''}")
    atomic_write_json(out / f"{stem}.json", report)
    md = markdown(report)
    tmp = out / f".{stem}.md.tmp"
    tmp.write_text(md)
    tmp.replace(out / f"{stem}.md")
    print_table(report)
    log(f"wrote {out / (stem + '.md')} and .json")
    return report


if __name__ == "__main__":
    main()
