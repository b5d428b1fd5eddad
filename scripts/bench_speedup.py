#!/usr/bin/env python
"""Speedup of token merging over the unmerged backbone, on one device, with FLOPs for reference.

Builds the unmerged model (``peft``) and each method at each schedule (``low``/``high``), and measures the
*inference model* of each (LoRA merged into qkv): MACs with fvcore (+ explicit attention) and the time of
whole forwards under the authors' protocol (eval, ``torch.inference_mode``, one random input, device sync
after each forward). All configurations are timed in one interleaved run in which a sample of the
unmerged model sits between every two samples of the others, whose order rotates every round, ToMe and
PYRA of a schedule next to each other (:func:`pyra_bench.measure.time_sandwiched`): a config's speedup
is the median over its samples of the two flanking unmerged samples' mean time over its own, and PYRA /
ToMe the median over rounds of their speedups' ratio, so the drift of a shared machine cancels on the
scale of seconds. A sample of a fast configuration is k forwards back to back (k = the slowest warm-up
forward / its own), so every sample spans about the same time and a stall of the machine costs each
configuration the same share (``--no-balance``: one forward per sample). On the CPU every
configuration's Linear weights are pre-packed for MKL's GEMM (:mod:`pyra_bench.models.prepack`;
``--no-prepack`` times them as they are): repacking a weight costs as much as a GEMM at a merged block's
few rows, and would be charged to the merged models most. Reported: img/s, speedup, the MACs ratio,
speedup / (1 / MACs ratio) -- the share of the FLOPs reduction that turns into speed (targets: >= 100 %
at low, >= 98 % at high) -- and PYRA's speed relative to ToMe (target: at most 1 % slower). Where the
time goes: ``scripts/profile_merge.py``.

Writes ``results/bench/speedup_<device-slug>.md`` and ``.json``.

    python scripts/bench_speedup.py                  # CPU: ViT-B/16, batch 8, 1 thread, 600 s timed
    python scripts/bench_speedup.py --device cuda    # batch 512, ViT-B and ViT-L, 60 s timed
    python scripts/bench_speedup.py --quick          # smoke run on the tiny test ViT
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pyra_bench.measure import (  # noqa: E402
    DTYPES,
    MEASURED_MODEL,
    compile_model,
    count_flops,
    default_batch_size,
    device_name,
    device_slug,
    input_spec,
    sdpa_backend_context,
    software_versions,
    time_sandwiched,
)
from pyra_bench.methods import METHODS  # noqa: E402
from pyra_bench.models import build_model  # noqa: E402
from pyra_bench.models.macs import BUDGETS  # noqa: E402
from pyra_bench.models.prepack import prepack_available, prepack_linears  # noqa: E402
from pyra_bench.records import atomic_write_json  # noqa: E402

BASELINE = ("peft", "none")
TARGET_EFFICIENCY = {"low": 1.00, "high": 0.98}  # speedup / (1 / MACs ratio), per schedule
TARGET_PYRA_VS_TOME = 0.99  # PYRA img/s >= 99 % of ToMe's


def build_inference(backbone: str, method: str, schedule: str, advance_stages: bool = False):
    """The inference model of a freshly built model. ``advance_stages`` enters the method's stages in order
    without data or training, which gives the deployed structure of methods whose structure the budget fixes
    (SPViT's keep counts, RaP's kept channels); a method that needs data there raises."""
    torch.manual_seed(0)
    model = build_model(backbone, 100, method, schedule, drop_path_rate=0.0)
    m = model.pyra_method
    stages = [s.name for s in m.stages()]
    if advance_stages:
        for st in m.stages():
            m.on_stage_start(st, model, None)
    return m.inference_model(model).eval(), stages


def build_configs(backbone: str, methods: list[str], schedules: list[str], log) -> tuple[list[dict], list[dict]]:
    """The baseline and every measurable (method, schedule); what cannot be built without data is skipped."""
    model, _ = build_inference(backbone, *BASELINE)
    base = count_flops(model, image_size=None)
    configs, skipped = [{"backbone": backbone, "method": BASELINE[0], "schedule": BASELINE[1], "model": model,
                         "flops": base, "note": None}], []
    for method in (m for m in methods if m != BASELINE[0]):
        for sch in schedules:
            note = None
            try:
                model, stages = build_inference(backbone, method, sch)
                flops = count_flops(model, image_size=None)
                if flops["gmacs"] >= 0.99 * base["gmacs"] and len(stages) > 1:
                    model, _ = build_inference(backbone, method, sch, advance_stages=True)
                    flops = count_flops(model, image_size=None)
                    note = f"structure reached by entering its stages {stages} without data or training"
            except Exception as e:  # noqa: BLE001 - report, do not abort the benchmark
                skipped.append({"backbone": backbone, "method": method, "schedule": sch,
                                "reason": f"cannot be built without data: {type(e).__name__}: {e}"})
                continue
            frac, budget = flops["gmacs"] / base["gmacs"], BUDGETS.get(sch)
            if frac >= 0.99 or (note and budget is not None and abs(frac - budget) > 0.05):
                skipped.append({"backbone": backbone, "method": method, "schedule": sch,
                                "reason": f"its structure comes from a data-driven search (built without data it "
                                          f"keeps {frac:.3f} of the MACs)"})
                continue
            configs.append({"backbone": backbone, "method": method, "schedule": sch, "model": model,
                            "flops": flops, "note": note})
            log(f"  {backbone} {method:>8} {sch:<5} {flops['gmacs']:.3f} GMACs, {flops['tokens_final']} tokens out")
    for s in skipped:
        log(f"  skip {s['method']} {s['schedule']}: {s['reason']}")
    return configs, skipped


def run_interleaved(configs: list[dict], tkw: dict, duration_s: float, log) -> None:
    """Time whole forwards of every config in one interleaved run with a sample of the unmerged model
    between every two others (:func:`pyra_bench.measure.time_sandwiched`), the others' order rotated every
    round, until ``duration_s`` seconds are timed."""
    dev = torch.device(tkw["device"])
    ch, size = input_spec(configs[0]["model"])
    x = torch.randn(tkw["batch_size"], ch, size, size, device=dev)
    amp = tkw["dtype"] != "float32"
    autocast = torch.autocast(dev.type, dtype=DTYPES[tkw["dtype"]]) if amp else contextlib.nullcontext()
    torch.backends.cudnn.benchmark = True  # as the authors
    with torch.inference_mode(), autocast, sdpa_backend_context(tkw["sdpa_backend"]):
        fns = {}
        for c in _timing_order(configs):
            net = c["model"].eval()
            if tkw["prepack"]:
                net = prepack_linears(net, x)
            net = compile_model(net, tkw["compile"])
            fns[_key(c)] = lambda net=net: net(x)
            if tkw["compile"]:
                t0 = time.perf_counter()
                fns[_key(c)]()
                log(f"  compiled {_key(c)} in {time.perf_counter() - t0:.1f} s")
        log(f"  timing {len(fns)} configs, the unmerged model between every two others, for {duration_s:g} s "
            f"(+ {tkw['warmup_rounds']} warm-up round(s))")
        times, flanks = time_sandwiched(fns, _key(configs[0]), dev, duration_s, min_rounds=3,
                                        warmup_rounds=tkw["warmup_rounds"], balance=tkw["balance"])
    for c in configs:
        c["times"], c["flanks"] = times[_key(c)], flanks.get(_key(c))
    log(f"  {len(configs[1]['times']) if len(configs) > 1 else 0} rounds")


def _timing_order(configs: list[dict]) -> list[dict]:
    """The baseline, then per schedule ToMe and PYRA next to each other (one reference sample apart, and the
    round's rotation keeps them so in all but one round of each cycle), then the rest as built."""
    paired = [c for sch in dict.fromkeys(c["schedule"] for c in configs) for m in ("tome", "pyra")
              for c in configs if c["method"] == m and c["schedule"] == sch]
    taken = {id(c) for c in paired}
    return [configs[0], *paired, *(c for c in configs[1:] if id(c) not in taken)]


def _key(c: dict) -> str:
    return f"{c['backbone']}/{c['method']}/{c['schedule']}"


def _median_iqr(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return statistics.median(values), q[0], q[2]


def summarise(configs: list[dict], batch: int) -> list[dict]:
    """Per config: img/s = batch / median forward time; speedup = median over its samples of the flanking
    unmerged forwards' mean time / its time; vs-ToMe = median over rounds of its speedup / ToMe's (with
    their interquartile ranges)."""
    by_key = {(c["backbone"], c["method"], c["schedule"]): c for c in configs}
    per_sample = {id(c): [f / t for f, t in zip(c["flanks"], c["times"])] if c["flanks"] else None
                  for c in configs}
    rows = []
    for c in configs:
        tome = by_key.get((c["backbone"], "tome", c["schedule"]))
        ratios = per_sample[id(c)]
        speedup, s_lo, s_hi = _median_iqr(ratios) if ratios else (1.0, 1.0, 1.0)
        base = by_key[(c["backbone"], *BASELINE)]
        macs_ratio = c["flops"]["gmacs"] / base["flops"]["gmacs"]
        vs_tome = None
        if tome is not None and c["method"] not in ("tome", BASELINE[0]):
            vs_tome = _median_iqr([a / b for a, b in zip(ratios, per_sample[id(tome)])])
        rows.append({
            "backbone": c["backbone"], "method": c["method"], "schedule": c["schedule"],
            "tokens_final": c["flops"]["tokens_final"], "gmacs": c["flops"]["gmacs"], "macs_ratio": macs_ratio,
            "img_per_s": batch / statistics.median(c["times"]), "img_per_s_mean": batch * len(c["times"]) / sum(c["times"]),
            "forward_s": c["times"], "reference_flank_s": c["flanks"], "speedup": speedup, "speedup_iqr": [s_lo, s_hi],
            "efficiency": speedup * macs_ratio, "target_efficiency": TARGET_EFFICIENCY.get(c["schedule"]),
            "vs_tome": vs_tome[0] if vs_tome else None, "vs_tome_iqr": list(vs_tome[1:]) if vs_tome else None,
            "note": c["note"],
        })
    return rows


def markdown(rep: dict) -> str:
    s = rep["settings"]
    L = [f"# Token-merging speedup on {rep['device']}", "",
         f"Measured: {MEASURED_MODEL}, random-init weights. Protocol: eval, `torch.inference_mode`, random input, "
         f"batch {s['batch_size']}, {s['dtype']}{', torch.compile' if s['compile'] else ''}"
         f"{', Linear weights pre-packed for MKL (every config)' if s.get('prepack') else ''}, whole forwards "
         f"between device syncs, all configs in one interleaved run with an unmerged (PEFT) sample between "
         f"every two others (ToMe and PYRA of a schedule next to each other), the others' order rotated every "
         f"round: {rep['rounds']} rounds after "
         f"{s['warmup_rounds']} warm-up round(s) ({s['duration_s']:g} s timed)"
         f"{'; a sample of a fast config is k forwards back to back (k = the slowest warm-up forward / its own), so every sample spans about the same time and a stall of the machine costs each config the same share' if s.get('balance') else ''}. "
         f"img/s = batch / median forward time; speedup = median over a config's samples of the flanking PEFT "
         f"samples' mean time / its time, vs-ToMe = median over rounds of the two speedups' ratio "
         f"[interquartile ranges], so the drift of the machine cancels on the scale of seconds. MACs: fvcore + "
         f"explicit SDPA, per image. torch {rep['versions']['torch']}, timm {rep['versions']['timm']}, "
         f"{s['threads']} thread(s). Wall time {rep['wall_time_s']:.0f} s.", "",
         "| backbone | method | schedule | tokens out | GMACs | MACs ratio | img/s | speedup [IQR] | "
         "1/MACs ratio | speedup / (1/MACs ratio) | vs ToMe [IQR] |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rep["results"]:
        t = r["target_efficiency"]
        eff = "-" if r["method"] == BASELINE[0] else f"{100 * r['efficiency']:.1f}%" + (
            "" if t is None else f" {'OK' if r['efficiency'] >= t else 'MISSED'} (>= {100 * t:.0f}%)")
        vt = "-" if r["vs_tome"] is None else f"{r['vs_tome']:.3f} [{r['vs_tome_iqr'][0]:.3f}-{r['vs_tome_iqr'][1]:.3f}]" + (
            f" {'OK' if r['vs_tome'] >= TARGET_PYRA_VS_TOME else 'MISSED'}" if r["method"] == "pyra" else "")
        L.append(f"| {r['backbone']} | {r['method']} | {r['schedule']} | {r['tokens_final']} | {r['gmacs']:.2f} | "
                 f"{r['macs_ratio']:.3f} | {r['img_per_s']:.2f} | {r['speedup']:.3f}x [{r['speedup_iqr'][0]:.3f}-"
                 f"{r['speedup_iqr'][1]:.3f}] | {1 / r['macs_ratio']:.3f}x | {eff} | {vt} |")
    L += [""] + [f"- {r['method']} {r['schedule']}: {r['note']}" for r in rep["results"] if r["note"]]
    L += [f"- skipped {k['method']} {k['schedule']}: {k['reason']}" for k in rep["skipped"]]
    L += ["", f"Targets: speedup / (1/MACs ratio) >= {', '.join(f'{100 * v:.0f}% at {k}' for k, v in TARGET_EFFICIENCY.items())}"
              f"; PYRA >= {100 * TARGET_PYRA_VS_TOME:.0f}% of ToMe's speed at the same schedule.", ""]
    return "\n".join(L)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<i>")
    p.add_argument("--dtype", default="float32", help="float32 (the paper) | bfloat16 | float16 (autocast)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 512 on CUDA, 8 on the CPU")
    p.add_argument("--duration-s", type=float, default=None, help="timed seconds in all (default: CPU 600, CUDA 60)")
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--backbones", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--schedules", nargs="+", default=["low", "high"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1: stable timings)")
    p.add_argument("--sdpa-backend", default=None, choices=["auto", "flash", "efficient", "math", "cudnn"])
    p.add_argument("--compile", action="store_true", help="measure torch.compile'd inference models")
    p.add_argument("--no-prepack", action="store_true",
                   help="CPU: time the Linears as they are (default: weights pre-packed for MKL's GEMM, every "
                        "config alike; pyra_bench.models.prepack)")
    p.add_argument("--no-balance", action="store_true",
                   help="one forward per timed sample (default: a fast config runs k forwards per sample so that "
                        "every sample spans about the slowest config's forward; measure.time_sandwiched)")
    p.add_argument("--out-dir", default=str(ROOT / "results" / "bench"))
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--quick", action="store_true", help="smoke run: vit_tiny_test, a second of timing")
    a = p.parse_args(argv)
    cuda = torch.device(a.device).type == "cuda"
    if not cuda:
        torch.set_num_threads(a.threads or 1)
    if a.quick:
        a.backbones, a.duration_s = a.backbones or ["vit_tiny_test"], a.duration_s or 1.0
    backbones = a.backbones or (["vit_b16_in21k", "vit_l16_in21k"] if cuda else ["vit_b16_in21k"])
    tkw = {"batch_size": a.batch_size or default_batch_size(a.device), "device": a.device, "dtype": a.dtype,
           "duration_s": a.duration_s or (60.0 if cuda else 600.0), "warmup_rounds": a.warmup_rounds,
           "sdpa_backend": a.sdpa_backend, "compile": a.compile,
           "prepack": not a.no_prepack and not a.compile and prepack_available(a.device, DTYPES[a.dtype]),
           "balance": not a.no_balance and a.warmup_rounds >= 1}
    methods = a.methods or METHODS.names()
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    log(f"{device_name(a.device)}; methods {methods}; schedules {a.schedules}; batch {tkw['batch_size']}")
    results, skipped, rounds = [], [], 0
    for bb in backbones:
        configs, sk = build_configs(bb, methods, a.schedules, log)
        skipped += sk
        for c in configs:
            c["model"].to(a.device)
        run_interleaved(configs, tkw, tkw["duration_s"] / len(backbones), log)
        results += summarise(configs, tkw["batch_size"])
        rounds = len(configs[1]["times"]) if len(configs) > 1 else 0
        for c in configs:
            c["model"] = None
        if cuda:
            torch.cuda.empty_cache()
    report = {
        "kind": "bench_speedup", "device": device_name(a.device), "device_slug": device_slug(a.device),
        "measured": MEASURED_MODEL, "rounds": rounds,
        "settings": {**tkw, "threads": torch.get_num_threads(), "backbones": backbones, "methods": methods},
        "targets": {"efficiency": TARGET_EFFICIENCY, "pyra_vs_tome_min": TARGET_PYRA_VS_TOME},
        "results": results, "skipped": skipped, "versions": software_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_time_s": time.time() - t0,
    }
    out = Path(a.out_dir)
    stem = f"speedup_{report['device_slug']}{('_' + a.tag) if a.tag else ''}"
    atomic_write_json(out / f"{stem}.json", report)
    md = markdown(report)
    (out / f".{stem}.md.tmp").write_text(md)
    (out / f".{stem}.md.tmp").replace(out / f"{stem}.md")
    print("\n" + md)
    log(f"wrote {out / stem}.md and .json")
    return report


if __name__ == "__main__":
    main()
