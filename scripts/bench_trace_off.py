#!/usr/bin/env python
"""Source tracing off costs nothing: ViT-B/16 ToMe inference speed on the CPU, this checkout against the code
before tracing existed, interleaved.

The package at ``--baseline-rev`` (default: the commit before source tracing) is extracted with ``git
archive`` into a temporary folder as ``pyra_bench_base`` (its imports are relative), so both versions run in
one process on one machine. For each schedule the two inference models (same weights, LoRA merged, Linear
weights pre-packed as ``scripts/bench_speedup.py`` does) are timed with
:func:`pyra_bench.measure.time_sandwiched`: every sample of this checkout's model sits between two samples
of the baseline's, so the ratio (baseline flank time / own time: > 1 is faster) compares samples seconds
apart. Target: the median ratio within 1 % of 1. Their logits are checked to be identical first. On one
thread the samples are the process's CPU time by default (``--clock cpu``): on a shared machine the other
jobs' load spreads wall time by +-15 % per sample (seen here), CPU time far less; ``--clock wall`` times
wall-clock seconds as ``scripts/bench_speedup.py`` does.

Writes ``results/bench/trace_off_<device-slug>.md`` and ``.json``.

    python scripts/bench_trace_off.py                       # ViT-B/16, ToMe low + high, batch 2, 1 thread, 240 s
    python scripts/bench_trace_off.py --quick               # smoke run on the tiny test ViT
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pyra_bench.fileio import atomic_write_text  # noqa: E402
from pyra_bench.measure import device_name, device_slug, software_versions, time_sandwiched  # noqa: E402
from pyra_bench.models import build_model  # noqa: E402
from pyra_bench.models.prepack import prepack_available, prepack_linears  # noqa: E402
from pyra_bench.records import atomic_write_json  # noqa: E402

BASELINE_REV = "5adb153"  # the last commit before source tracing
TARGET = 0.01  # |median ratio - 1| <= 1 %


def import_baseline(rev: str, into: Path):
    """``pyra_bench`` as it was at ``rev``, importable as ``pyra_bench_base``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "pyra_bench"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "pyra_bench").rename(into / "pyra_bench_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("pyra_bench_base.models")


def median_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free ~95 % interval of the median: the order statistics n/2 -+ z sqrt(n)/2."""
    v, n = sorted(values), len(values)
    half = z * n ** 0.5 / 2
    return v[max(0, int(n / 2 - half))], v[min(n - 1, int(n / 2 + half + 0.5))]


def inference(build, backbone: str, schedule: str, state=None):
    torch.manual_seed(0)
    model = build(backbone, 100, "tome", schedule, drop_path_rate=0.0)
    infer = model.pyra_method.inference_model(model).eval()
    if state is not None:
        infer.load_state_dict(state, strict=True)
    return infer


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--backbone", default="vit_b16_in21k")
    ap.add_argument("--schedules", nargs="+", default=["low", "high"])
    ap.add_argument("--batch-size", type=int, default=2, help="2: more samples per minute than 8 (the committed run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--duration", type=float, default=240.0, help="seconds timed in all (split over schedules)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: the process's CPU time (time.process_time; one thread); wall: time.perf_counter")
    ap.add_argument("--out", default=str(ROOT / "results" / "bench"))
    ap.add_argument("--quick", action="store_true", help="tiny test ViT, 4 s: a smoke run")
    a = ap.parse_args(argv)
    if a.quick:
        a.backbone, a.duration = "vit_tiny_test", 4.0
    torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    t_start = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = import_baseline(a.baseline_rev, Path(tmp))
        for sched in a.schedules:
            new = inference(build_model, a.backbone, sched)
            old = inference(base.build_model, a.backbone, sched, state=new.state_dict())
            size = new.patch_embed.img_size[0]
            x = torch.randn(a.batch_size, 3, size, size)
            with torch.inference_mode():
                if not torch.equal(new(x), old(x)):
                    raise SystemExit(f"{sched}: the two versions' logits differ; not the same model")
                if prepack_available():
                    new, old = prepack_linears(new, x), prepack_linears(old, x)
                fns = {"before": lambda o=old, x=x: o(x), "after": lambda n=new, x=x: n(x)}
                times, flanks = time_sandwiched(fns, "before", "cpu", a.duration / len(a.schedules), min_rounds=5,
                                                clock=clock)
            ratios = [f / t for f, t in zip(flanks["after"], times["after"])]
            q = statistics.quantiles(ratios, n=4)
            med, (lo, hi) = statistics.median(ratios), median_ci(ratios)
            rows.append({"schedule": sched, "samples": len(ratios), "ratio_median": med, "ratio_q1": q[0],
                         "ratio_q3": q[2], "median_ci95": [lo, hi], "ms_before": 1e3 * statistics.median(times["before"]),
                         "ms_after": 1e3 * statistics.median(times["after"]), "within_target": abs(med - 1) <= TARGET,
                         "ratios": ratios})
            print(f"{sched}: after/before speed {med:.4f} (95 % CI {lo:.4f}-{hi:.4f}, IQR {q[0]:.4f}-{q[2]:.4f}, "
                  f"{len(ratios)} samples)")
    slug = device_slug("cpu")
    rec = {"what": "ViT ToMe inference speed with source tracing off vs the code before it (interleaved)",
           "backbone": a.backbone, "baseline_rev": a.baseline_rev, "batch_size": a.batch_size, "threads": a.threads,
           "duration_s": a.duration, "clock": a.clock, "device": device_name("cpu"), "prepacked": prepack_available(),
           "target": f"|median ratio - 1| <= {TARGET:.0%}", "rows": rows, "versions": software_versions(),
           "wall_s": round(time.time() - t_start, 1)}
    if a.quick:
        return rec
    out = Path(a.out)
    clock_name = "CPU time of the process" if a.clock == "cpu" else "wall time"
    atomic_write_json(out / f"trace_off_{slug}.json", rec)
    lines = [f"# Source tracing off: {a.backbone} ToMe inference speed vs the code before it ({rec['device']})", "",
             f"`python scripts/bench_trace_off.py` -- batch {a.batch_size}, {a.threads} thread(s), Linear weights "
             f"pre-packed: {rec['prepacked']}; baseline: `git archive {a.baseline_rev}`; "
             f"**a short run: {a.duration:g} s timed in all on a shared 2-core CPU** (other jobs ran beside it), "
             f"{rec['wall_s']:g} s wall; samples timed in {clock_name}. Ratio = the flanking baseline samples' "
             "mean time / this checkout's time "
             f"(> 1: faster); target {rec['target']}. Logits of the two versions identical (checked).", "",
             "| schedule | samples | ms/batch before | ms/batch after | speed ratio (median) | 95 % CI of the median "
             "| IQR | median within 1 % |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['schedule']} | {r['samples']} | {r['ms_before']:.1f} | {r['ms_after']:.1f} | "
              f"{r['ratio_median']:.4f} | {r['median_ci95'][0]:.4f}-{r['median_ci95'][1]:.4f} | "
              f"{r['ratio_q1']:.4f}-{r['ratio_q3']:.4f} | {'yes' if r['within_target'] else 'no'} |" for r in rows]
    lines += ["", "The two versions run the same tensor operations with tracing off (tests/test_trace.py checks the "
              "dispatched ops), so a difference is noise; the interval says how much this short run can resolve."]
    atomic_write_text(out / f"trace_off_{slug}.md", "\n".join(lines) + "\n")
    print(f"-> {out}/trace_off_{slug}.md")
    return rec


if __name__ == "__main__":
    main()
