#!/usr/bin/env python
"""Training speed of LoRA + token merging (the "training-efficient" half of PYRA's claim), on one device.

For one backbone it builds the PEFT model (LoRA, no merging) and each token-merging method at each
schedule, and measures whole training steps (forward, cross-entropy, backward, AdamW on LoRA + head +
the method's parameters; the backbone is frozen) with :func:`pyra_bench.measure.measure_training_step`.
Configurations are measured round-robin for ``--repeats`` rounds (order rotated each round) and the
median is reported, with the speedup over PEFT and the forward-MACs ratio for reference. Data loading is
excluded; the run records' ``training_cost`` has the figure with it.

    python scripts/bench_training.py                      # CPU: ViT-B/16, batch 8, 1 thread
    python scripts/bench_training.py --device cuda        # batch 64
    python scripts/bench_training.py --quick              # smoke run on the tiny test ViT

Writes ``results/bench/training_<device-slug>.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pyra_bench.measure import (  # noqa: E402
    count_flops,
    device_name,
    device_slug,
    inference_model,
    measure_training_step,
    software_versions,  # noqa: E402
)
from pyra_bench.models import build_model  # noqa: E402
from pyra_bench.records import atomic_write_json  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="vit_b16_in21k")
    p.add_argument("--methods", nargs="+", default=["tome", "pyra"])
    p.add_argument("--schedules", nargs="+", default=["low", "high"])
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on the CPU, 64 on CUDA")
    p.add_argument("--warmup-s", type=float, default=None)
    p.add_argument("--duration-s", type=float, default=None)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1 on the CPU: stable timings)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", action="store_true", help="train torch.compile'd models (compilation timed apart)")
    p.add_argument("--quick", action="store_true", help="tiny test ViT, tiny durations")
    p.add_argument("--out-dir", default=str(ROOT / "results" / "bench"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    cuda = a.device.startswith("cuda")
    if a.quick:
        a.backbone, batch, warm, dur = "vit_tiny_test", a.batch_size or 8, 0.0, 0.05
    else:
        batch = a.batch_size or (64 if cuda else 8)
        warm = a.warmup_s if a.warmup_s is not None else (5.0 if cuda else 10.0)
        dur = a.duration_s if a.duration_s is not None else (10.0 if cuda else 20.0)
    if not cuda:
        torch.set_num_threads(a.threads or 1)
    torch.manual_seed(0)
    configs = [("peft", "none")] + [(m, s) for s in a.schedules for m in a.methods]
    models, macs = {}, {}
    for m, s in configs:
        models[(m, s)] = build_model(a.backbone, 100, m, s if m != "peft" else None)
        macs[(m, s)] = count_flops(inference_model(models[(m, s)]), None, cross_check=False)["gmacs"]
    runs: dict[tuple[str, str], list[float]] = {c: [] for c in configs}
    last: dict[tuple[str, str], dict] = {}
    t_start = time.time()
    for rep in range(a.repeats):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        for c in order:
            r = measure_training_step(models[c], batch_size=batch, image_size=None, device=a.device, dtype=a.dtype,
                                      warmup_s=warm, duration_s=dur, compile=a.compile)
            runs[c].append(r["img_per_s"])
            last[c] = r
            print(f"[train-bench] round {rep + 1}/{a.repeats} {c[0]:>5} {c[1]:>5}: {r['img_per_s']:.3f} img/s "
                  f"({r['iters']} steps of batch {batch})", flush=True)
    base = statistics.median(runs[("peft", "none")])
    rows = []
    for c in configs:
        ips = statistics.median(runs[c])
        rows.append({"method": c[0], "schedule": c[1], "img_per_s": ips, "rounds": runs[c],
                     "speedup_vs_peft": ips / base, "gmacs_forward": macs[c],
                     "macs_ratio": macs[c] / macs[("peft", "none")],
                     "trainable_params": last[c]["trainable_params"]})
    pyra_vs_tome = {s: next(r["img_per_s"] for r in rows if r["method"] == "pyra" and r["schedule"] == s)
                    / next(r["img_per_s"] for r in rows if r["method"] == "tome" and r["schedule"] == s)
                    for s in a.schedules if "pyra" in a.methods and "tome" in a.methods}
    dev = device_name(a.device)
    report = {"kind": "training_bench", "backbone": a.backbone, "device": dev, "batch_size": batch,
              "dtype": a.dtype, "compile": a.compile, "threads": torch.get_num_threads(), "warmup_s": warm, "duration_s": dur,
              "repeats": a.repeats, "rows": rows, "pyra_vs_tome": pyra_vs_tome,
              "protocol": last[configs[0]]["protocol"], "versions": software_versions(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "wall_time_s": round(time.time() - t_start, 1)}
    lines = [f"# Training speed: {a.backbone} on {dev}", "",
             f"batch {batch}, {a.dtype}{', torch.compile' if a.compile else ''}, {torch.get_num_threads()} thread(s) on CPU, median of {a.repeats} "
             f"interleaved rounds ({warm:g} s warm-up + {dur:g} s per measurement). {report['protocol']}.", "",
             "| method | schedule | train img/s | speedup vs PEFT | forward MACs ratio | trainable params |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['schedule']} | {r['img_per_s']:.3f} | {r['speedup_vs_peft']:.2f}x | "
              f"{r['macs_ratio']:.3f} | {r['trainable_params']:,} |" for r in rows]
    if pyra_vs_tome:
        lines += ["", "PYRA / ToMe training throughput at the same schedule: "
                  + ", ".join(f"{s} {v:.3f}" for s, v in pyra_vs_tome.items())]
    md = "\n".join(lines) + "\n"
    print("\n" + md)
    if not a.quick:
        out = Path(a.out_dir)
        slug = device_slug(a.device)
        atomic_write_json(out / f"training_{slug}.json", report)
        (out / f"training_{slug}.md").write_text(md)
        print(f"written: {out}/training_{slug}.md / .json")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
