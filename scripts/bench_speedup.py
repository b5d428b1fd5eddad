#!/usr/bin/env python
"""Speedup of token merging over the unmerged backbone, on one device, with FLOPs for reference.

Builds the unmerged model (``peft``) and each method at each schedule (``low``/``high``), and measures the
*inference model* of each (LoRA merged into qkv): MACs with fvcore (+ explicit attention), images/s with
the authors' protocol (:func:`pyra_bench.measure.measure_throughput`). The configurations are timed
round-robin, rotating the order every repeat, each measurement bracketed by a float32 GEMM probe of the
machine's speed; runs taken while the machine was throttled (probe < 85 % of its reference) are left out
of the medians, and configurations short of clean runs get extra rounds. Reported: img/s (median of the
clean runs), speedup over the unmerged model, the MACs ratio, speedup / (1 / MACs ratio) -- the share of
the FLOPs reduction that turns into speed (targets: >= 100 % at low, >= 98 % at high) -- and PYRA's
throughput relative to ToMe (target: at most 1 % slower). Where time goes: ``scripts/profile_merge.py``.

Writes ``results/bench/speedup_<device-slug>.md`` and ``.json``.

    python scripts/bench_speedup.py                  # CPU: ViT-B/16, batch 8, 1 thread, 5 s + 10 s, 3 repeats
    python scripts/bench_speedup.py --device cuda    # batch 512, 10 s + 10 s, ViT-B and ViT-L
    python scripts/bench_speedup.py --quick          # smoke run on the tiny test ViT
"""

from __future__ import annotations

import argparse
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
    MEASURED_MODEL,
    count_flops,
    default_batch_size,
    device_name,
    device_slug,
    measure_throughput,
    software_versions,
)
from pyra_bench.methods import METHODS  # noqa: E402
from pyra_bench.models import build_model  # noqa: E402
from pyra_bench.models.macs import BUDGETS  # noqa: E402
from pyra_bench.records import atomic_write_json  # noqa: E402

BASELINE = ("peft", "none")
TARGET_EFFICIENCY = {"low": 1.00, "high": 0.98}  # speedup / (1 / MACs ratio), per schedule
TARGET_PYRA_VS_TOME = 0.99  # PYRA img/s >= 99 % of ToMe's
CLEAN_PROBE_FRACTION = 0.85


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


def machine_probe(device, n: int = 1024, seconds: float = 0.3) -> float:
    """GFLOP/s of a float32 GEMM: the machine's speed right now (exposes throttling and drift)."""
    dev = torch.device(device)
    a, b, out = (torch.randn(n, n, device=dev) for _ in range(3))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync()
    iters, t0 = 0, time.perf_counter()
    while iters < 3 or time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=out)
        iters += 1
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e9


def _measure(c: dict, tkw: dict, label: str, log) -> None:
    before = machine_probe(tkw["device"])
    r = measure_throughput(c["model"], **tkw)
    r["probes"] = (before, machine_probe(tkw["device"]))
    c["runs"].append(r)
    log(f"  {label} {c['method']:>8} {c['schedule']:<5} {r['img_per_s']:9.2f} img/s ({r['iters']} iters; "
        f"GEMM probe {r['probes'][0]:.0f}/{r['probes'][1]:.0f} GFLOP/s)")


def run_interleaved(configs: list[dict], repeats: int, tkw: dict, log, extra_rounds: int = 2) -> float:
    """Round-robin repeats (order rotated), then extra rounds for configs with < min(2, repeats) clean runs.
    Returns the machine's reference GEMM speed (upper-half median of all probes)."""
    for c in configs:
        c["runs"] = []
    for rep in range(repeats):
        for i in range(len(configs)):
            _measure(configs[(i + rep) % len(configs)], tkw, f"repeat {rep + 1}/{repeats}", log)

    def mark() -> float:
        probes = sorted(p for c in configs for r in c["runs"] for p in r["probes"])
        ref = statistics.median(probes[len(probes) // 2:])
        for c in configs:
            for r in c["runs"]:
                r["clean"] = min(r["probes"]) >= CLEAN_PROBE_FRACTION * ref
        return ref

    ref = mark()
    for extra in range(extra_rounds):
        short = [c for c in configs if sum(r["clean"] for r in c["runs"]) < min(2, repeats)]
        if not short:
            break
        for c in short:
            _measure(c, tkw, f"extra {extra + 1}/{extra_rounds}", log)
        ref = mark()
    return ref


def summarise(configs: list[dict]) -> list[dict]:
    def med(c):
        clean = [r["img_per_s"] for r in c["runs"] if r["clean"]]
        return statistics.median(clean or [r["img_per_s"] for r in c["runs"]])

    by_key = {(c["backbone"], c["method"], c["schedule"]): c for c in configs}
    rows = []
    for c in configs:
        base = by_key[(c["backbone"], *BASELINE)]
        ips, macs_ratio = med(c), c["flops"]["gmacs"] / base["flops"]["gmacs"]
        tome = by_key.get((c["backbone"], "tome", c["schedule"]))
        clean = [r["img_per_s"] for r in c["runs"] if r["clean"]] or [r["img_per_s"] for r in c["runs"]]
        rows.append({
            "backbone": c["backbone"], "method": c["method"], "schedule": c["schedule"],
            "tokens_final": c["flops"]["tokens_final"], "gmacs": c["flops"]["gmacs"], "macs_ratio": macs_ratio,
            "img_per_s": ips, "img_per_s_runs": [r["img_per_s"] for r in c["runs"]],
            "clean_runs": [r["clean"] for r in c["runs"]], "img_per_s_min": min(clean), "img_per_s_max": max(clean),
            "speedup": ips / med(base), "efficiency": ips / med(base) * macs_ratio,
            "target_efficiency": TARGET_EFFICIENCY.get(c["schedule"]),
            "vs_tome": ips / med(tome) if tome is not None and c["method"] not in ("tome", BASELINE[0]) else None,
            "note": c["note"],
        })
    return rows


def markdown(rep: dict) -> str:
    s, mp = rep["settings"], rep["machine_probe"]
    L = [f"# Token-merging speedup on {rep['device']}", "",
         f"Measured: {MEASURED_MODEL}, random-init weights. Protocol: eval, `torch.inference_mode`, random input, "
         f"batch {s['batch_size']}, {s['dtype']}{', torch.compile' if s['compile'] else ''}, {s['warmup_s']:g} s "
         f"warm-up + {s['duration_s']:g} s of timed whole forwards, {s['repeats']} interleaved repeats (order "
         f"rotated). MACs: fvcore + explicit SDPA, per image. torch {rep['versions']['torch']}, timm "
         f"{rep['versions']['timm']}, {s['threads']} thread(s). Wall time {rep['wall_time_s']:.0f} s.", "",
         f"GEMM probe around every measurement: reference {mp['reference']:.0f} GFLOP/s (range {mp['min']:.0f}-"
         f"{mp['max']:.0f}); {mp['throttled']} of {mp['runs']} runs below {100 * CLEAN_PROBE_FRACTION:.0f} % of it "
         f"were left out. img/s = median of the clean runs [min-max]; ratios are ratios of medians.", "",
         "| backbone | method | schedule | tokens out | GMACs | MACs ratio | img/s [min-max] | speedup | "
         "1/MACs ratio | speedup / (1/MACs ratio) | vs ToMe |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rep["results"]:
        t = r["target_efficiency"]
        eff = "-" if r["method"] == BASELINE[0] else f"{100 * r['efficiency']:.1f}%" + (
            "" if t is None else f" {'OK' if r['efficiency'] >= t else 'MISSED'} (>= {100 * t:.0f}%)")
        vt = "-" if r["vs_tome"] is None else f"{r['vs_tome']:.3f}" + (
            f" {'OK' if r['vs_tome'] >= TARGET_PYRA_VS_TOME else 'MISSED'}" if r["method"] == "pyra" else "")
        L.append(f"| {r['backbone']} | {r['method']} | {r['schedule']} | {r['tokens_final']} | {r['gmacs']:.2f} | "
                 f"{r['macs_ratio']:.3f} | {r['img_per_s']:.2f} [{r['img_per_s_min']:.2f}-{r['img_per_s_max']:.2f}] | "
                 f"{r['speedup']:.2f}x | {1 / r['macs_ratio']:.2f}x | {eff} | {vt} |")
    L += [""] + [f"- {r['method']} {r['schedule']}: {r['note']}" for r in rep["results"] if r["note"]]
    L += [f"- skipped {k['method']} {k['schedule']}: {k['reason']}" for k in rep["skipped"]]
    L += ["", f"Targets: speedup / (1/MACs ratio) >= {', '.join(f'{100 * v:.0f}% at {k}' for k, v in TARGET_EFFICIENCY.items())}"
              f"; PYRA >= {100 * TARGET_PYRA_VS_TOME:.0f}% of ToMe's img/s at the same schedule.", ""]
    return "\n".join(L)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<i>")
    p.add_argument("--dtype", default="float32", help="float32 (the paper) | bfloat16 | float16 (autocast)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 512 on CUDA, 8 on the CPU")
    p.add_argument("--warmup-s", type=float, default=None)
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--extra-rounds", type=int, default=2)
    p.add_argument("--backbones", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument("--schedules", nargs="+", default=["low", "high"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1: stable timings)")
    p.add_argument("--sdpa-backend", default=None, choices=["auto", "flash", "efficient", "math", "cudnn"])
    p.add_argument("--compile", action="store_true", help="measure torch.compile'd inference models")
    p.add_argument("--out-dir", default=str(ROOT / "results" / "bench"))
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--quick", action="store_true", help="smoke run: vit_tiny_test, tiny durations")
    a = p.parse_args(argv)
    cuda = torch.device(a.device).type == "cuda"
    if not cuda:
        torch.set_num_threads(a.threads or 1)
    if a.quick:
        a.backbones, a.duration_s, a.repeats = a.backbones or ["vit_tiny_test"], 0.3, min(a.repeats, 2)
        a.warmup_s = 0.2 if a.warmup_s is None else a.warmup_s
    backbones = a.backbones or (["vit_b16_in21k", "vit_l16_in21k"] if cuda else ["vit_b16_in21k"])
    tkw = {"batch_size": a.batch_size or default_batch_size(a.device), "device": a.device, "dtype": a.dtype,
           "warmup_s": a.warmup_s if a.warmup_s is not None else (10.0 if cuda else 5.0),
           "duration_s": a.duration_s, "image_size": None, "sdpa_backend": a.sdpa_backend, "compile": a.compile}
    methods = a.methods or METHODS.names()
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    log(f"{device_name(a.device)}; methods {methods}; schedules {a.schedules}; batch {tkw['batch_size']}")
    results, skipped, refs, probes = [], [], [], []
    for bb in backbones:
        configs, sk = build_configs(bb, methods, a.schedules, log)
        skipped += sk
        for c in configs:
            c["model"].to(a.device)
        refs.append(run_interleaved(configs, a.repeats, tkw, log, a.extra_rounds))
        results += summarise(configs)
        probes += [p for c in configs for r in c["runs"] for p in r["probes"]]
        for c in configs:
            c["model"] = None
    report = {
        "kind": "bench_speedup", "device": device_name(a.device), "device_slug": device_slug(a.device),
        "measured": MEASURED_MODEL,
        "settings": {**{k: v for k, v in tkw.items() if k != "image_size"}, "repeats": a.repeats,
                     "threads": torch.get_num_threads(), "backbones": backbones, "methods": methods},
        "targets": {"efficiency": TARGET_EFFICIENCY, "pyra_vs_tome_min": TARGET_PYRA_VS_TOME},
        "results": results, "skipped": skipped, "versions": software_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "wall_time_s": time.time() - t0,
        "machine_probe": {"reference": statistics.median(refs), "min": min(probes), "max": max(probes),
                          "runs": sum(len(r["clean_runs"]) for r in results),
                          "throttled": sum(not x for r in results for x in r["clean_runs"])},
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
