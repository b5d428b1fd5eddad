#!/usr/bin/env python
"""The GPU check (run it through ``scripts/gpu_check.sh``): every figure a GPU session should bring back, in
one process that finishes in at most 8 minutes on one GPU, writing ``<out-dir>/<device-slug>.md`` and
``.json`` after every step (a step that fails is recorded and the others still run; steps past
``--budget-s`` are skipped, and say so).

Steps:
1. ``throughput``: PEFT, ToMe and PYRA at low and high, float32 and bfloat16 autocast, batch 512 (the
   authors' protocol, :func:`pyra_bench.measure.measure_throughput`), with the speedup over PEFT, the
   MACs ratio and PYRA / ToMe.
2. ``training``: training-step images/s and peak memory (forward, backward, AdamW; batch 64).
3. ``data``: the on-device normalisation against the CPU's (bit-identical?) and the input pipeline per
   core, JPEG vs cached (``scripts/bench_data.py``), on the prepared folder.
4. ``runs``: a short full-size training run (``python -m pyra_bench.train``, ViT-B/16, random weights, a
   few steps, evaluation on the test split) on TFDS mock data (``pyra_bench.data.prepare.mock_tfds``;
   without tensorflow-datasets, a synthetic folder of the same layout), twice with the same seed and
   ``trainer.deterministic=true``: the records' metrics and the exported weights must be identical.

``--quick`` runs the same steps on the CPU with the tiny test ViT (``vit_tiny_test``) in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from pyra_bench.measure import (  # noqa: E402
    device_name,
    device_slug,
    inference_model,
    measure_throughput,
    measure_training_step,
    software_versions,
)
from pyra_bench.models import build_model  # noqa: E402
from pyra_bench.models.macs import model_macs  # noqa: E402

CONFIGS = [("peft", "none"), ("tome", "low"), ("pyra", "low"), ("tome", "high"), ("pyra", "high")]
TASK = "cifar100"  # the mock task (32 x 32 images, 100 classes)


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"backbone": "vit_tiny_test", "image_size": 32, "batch": 8, "warmup_s": 0.0, "duration_s": 0.05, "train_batch": 8,
                "train_warmup_s": 0.0, "train_duration_s": 0.05, "data_seconds": 0.3, "sizes": {"train": 64, "test": 40},
                "run_overrides": ["backbone=vit_tiny_test", "trainer=smoke"], "run_timeout_s": 300}
    return {"backbone": "vit_b16_in21k", "image_size": 224, "batch": 512, "warmup_s": 2.0, "duration_s": 3.0, "train_batch": 64,
            "train_warmup_s": 1.0, "train_duration_s": 2.0, "data_seconds": 2.0, "sizes": {"train": 1000, "test": 500},
            "run_overrides": ["backbone=vit_b16_in21k", "trainer=smoke", "trainer.batch_size=32",
                              "trainer.eval_batch_size=256", "trainer.max_steps_per_epoch=10", "trainer.epochs=2",
                              "trainer.num_workers=4"], "run_timeout_s": 200}


def _models(backbone: str) -> dict[tuple[str, str], torch.nn.Module]:
    out = {}
    for m, s in CONFIGS:
        torch.manual_seed(0)
        out[(m, s)] = build_model(backbone, 100, m, None if s == "none" else s, drop_path_rate=0.0)
    return out


def step_throughput(cfg: dict, device: str, models: dict) -> dict:
    rows = []
    for dtype in ("float32", "bfloat16"):
        for (m, s), model in models.items():
            infer = inference_model(model)
            r = measure_throughput(infer, batch_size=cfg["batch"], image_size=None, device=device, dtype=dtype,
                                   warmup_s=cfg["warmup_s"], duration_s=cfg["duration_s"])
            rows.append({"method": m, "schedule": s, "dtype": dtype, "img_per_s": r["img_per_s"],
                         "peak_memory_gib": r["peak_memory_gib"], "gmacs": model_macs(infer.cpu(), True) / 1e9,
                         "iters": r["iters"]})
            print(f"[gpu-check] throughput {dtype:>8} {m:>4} {s:<4} {r['img_per_s']:10.1f} img/s", flush=True)
    for r in rows:
        base = next(b for b in rows if b["dtype"] == r["dtype"] and b["method"] == "peft")
        tome = next((t for t in rows if t["dtype"] == r["dtype"] and t["method"] == "tome"
                     and t["schedule"] == r["schedule"]), None)
        r["speedup"] = r["img_per_s"] / base["img_per_s"]
        r["macs_ratio"] = r["gmacs"] / base["gmacs"]
        r["efficiency"] = r["speedup"] * r["macs_ratio"]
        r["pyra_vs_tome"] = r["img_per_s"] / tome["img_per_s"] if r["method"] == "pyra" and tome else None
    return {"batch_size": cfg["batch"], "rows": rows, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def step_training(cfg: dict, device: str, models: dict) -> dict:
    rows = []
    for dtype in ("float32", "bfloat16"):
        for (m, s), model in models.items():
            r = measure_training_step(model, batch_size=cfg["train_batch"], image_size=None, device=device,
                                      dtype=dtype, warmup_s=cfg["train_warmup_s"], duration_s=cfg["train_duration_s"])
            rows.append({"method": m, "schedule": s, "dtype": dtype, "img_per_s": r["img_per_s"],
                         "peak_memory_gib": r["peak_memory_gib"], "iters": r["iters"]})
            print(f"[gpu-check] training   {dtype:>8} {m:>4} {s:<4} {r['img_per_s']:10.1f} img/s", flush=True)
    for r in rows:
        base = next(b for b in rows if b["dtype"] == r["dtype"] and b["method"] == "peft")
        r["speedup"] = r["img_per_s"] / base["img_per_s"]
    return {"batch_size": cfg["train_batch"], "rows": rows}


def write_synthetic_task(root: Path, sizes: dict[str, int], task: str = TASK) -> Path:
    """A folder in the VTAB-1k layout with random 32 x 32 JPEGs (when tensorflow-datasets is missing)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    n_train, n_test = int(sizes["train"]), int(sizes["test"])
    for split, n in (("train800val200", n_train), ("test", n_test)):
        (root / task / "images" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                root / task / "images" / split / f"{i:06d}.jpg", quality=75)
            lines.append(f"images/{split}/{i:06d}.jpg {rng.integers(0, 100)}")
        (root / task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    k = int(0.8 * n_train)
    lines = (root / task / "train800val200.txt").read_text().splitlines()
    (root / task / "train800.txt").write_text("\n".join(lines[:k]) + "\n")
    (root / task / "val200.txt").write_text("\n".join(lines[k:]) + "\n")
    return root / task


def prepare_data(cfg: dict, work: Path, quick: bool) -> tuple[Path, str]:
    """``<work>/data/cifar100`` from TFDS mock data (needs tensorflow-datasets), else a synthetic folder.
    Quick mode always writes the (small, import-free) synthetic folder."""
    root = work / "data"
    if (root / TASK / "test.txt").exists():
        return root, "existing folder"
    if not quick:
        try:
            from pyra_bench.data import prepare as P

            sizes = {"train": max(2000, cfg["sizes"]["train"] + 200), "test": cfg["sizes"]["test"]}
            with P.mock_tfds(sizes):
                P.prepare_task(TASK, root, mock=True, progress=False, workers=4)
            return root, "TFDS mock data (pyra_bench.data.prepare.mock_tfds)"
        except ImportError as e:
            print(f"[gpu-check] tensorflow-datasets not available ({e}): writing a synthetic folder", flush=True)
    write_synthetic_task(root, cfg["sizes"])
    return root, "synthetic random JPEGs in the VTAB-1k layout (no tensorflow-datasets)"


def step_data(cfg: dict, device: str, data_root: Path, task: str, work: Path) -> dict:
    import bench_data

    from pyra_bench.data.transforms import Uint8Normalizer

    x = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    norm = Uint8Normalizer.from_name("imagenet")
    on_dev = norm(x.to(device)).cpu()
    rep = bench_data.main(["--data-root", str(data_root), "--task", task, "--seconds", str(cfg["data_seconds"]),
                           "--cache-dir", str(work / "input-cache"), "--batch-size", "32",
                           "--image-size", str(cfg["image_size"])])
    return {"device_normalise_bit_identical": bool(torch.equal(on_dev, norm(x))),
            "table_bit_identical": bool(torch.equal(norm.by_table(x.to(device)).cpu(), norm(x))),
            "jpeg_img_per_cpu_s": rep["paths"]["jpeg"]["img_per_cpu_s"],
            "cached_img_per_cpu_s": rep["paths"]["cached"]["img_per_cpu_s"],
            "cached_over_jpeg": rep["cached_over_jpeg"], "source": rep["source_sizes_sample"]}


def _train_run(cfg: dict, data_root: Path, task: str, out: Path, device: str) -> dict:
    args = [sys.executable, "-m", "pyra_bench.train", f"task={task}", f"data_root={data_root}",
            "backbone.weights=none", "method=pyra", "compression=high", "seed=0", "trainer.deterministic=true",
            "logger=csv", f"results_dir={out}/results", f"run_dir={out}/run", "trainer.eval_every=1",
            f"trainer.accelerator={'gpu' if device.startswith('cuda') else 'cpu'}", *cfg["run_overrides"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYRA_INPUT_CACHE": str(out.parent / "input-cache"), "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        p = subprocess.Popen(args, cwd=out.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    return {"proc": p, "t0": t0, "out": out, "args": args}


def _finish(run: dict, timeout: float) -> dict:
    rc = run["proc"].wait(timeout=timeout)
    wall = time.perf_counter() - run["t0"]
    log = run["out"].with_suffix(".log").read_text()
    if rc != 0:
        raise RuntimeError(f"training run failed (exit {rc}); last lines:\n" + "\n".join(log.splitlines()[-25:]))
    (rec_path,) = (run["out"] / "results").glob("*.json")
    rec = json.loads(rec_path.read_text())
    from safetensors.torch import load_file

    sd = load_file(str(run["out"] / "run" / "inference_model.safetensors"))
    return {"wall_s": wall, "record": rec, "state_dict": sd}


def step_runs(cfg: dict, device: str, data_root: Path, task: str, work: Path, parallel: bool) -> dict:
    """Two identical seeded, deterministic runs (in parallel on the CPU in quick mode)."""
    a = _train_run(cfg, data_root, task, work / "run_a", device)
    if not parallel:
        ra = _finish(a, cfg["run_timeout_s"])
    b = _train_run(cfg, data_root, task, work / "run_b", device)
    if parallel:
        ra = _finish(a, cfg["run_timeout_s"])
    rb = _finish(b, cfg["run_timeout_s"])
    keys = sorted(set(ra["state_dict"]) | set(rb["state_dict"]))
    differ = [k for k in keys if k not in ra["state_dict"] or k not in rb["state_dict"]
              or not torch.equal(ra["state_dict"][k], rb["state_dict"][k])]
    rec = ra["record"]
    return {"command": " ".join(a["args"][1:]), "wall_s": [ra["wall_s"], rb["wall_s"]],
            "test_top1": [ra["record"]["metrics"]["test_top1"], rb["record"]["metrics"]["test_top1"]],
            "test_images": rec["metrics"].get("test_images"), "training_cost": rec.get("training_cost"),
            "gmacs": (rec.get("flops") or {}).get("gmacs"), "metrics_identical": ra["record"]["metrics"] == rb["record"]["metrics"],
            "weights_identical": not differ, "tensors_compared": len(keys), "tensors_differing": differ[:10],
            "deterministic": ra["record"]["metrics"] == rb["record"]["metrics"] and not differ}


def markdown(rep: dict) -> str:
    L = [f"# GPU check: {rep['device']}", "", f"{'QUICK (CPU, tiny ViT) -- ' if rep['quick'] else ''}backbone "
         f"{rep['backbone']}; torch {rep['versions']['torch']}, timm {rep['versions']['timm']}; wall time "
         f"{rep['wall_s']:.0f} s; steps: " + ", ".join(f"{k} {v}" for k, v in rep["status"].items()), ""]
    t = rep.get("throughput")
    if t:
        L += [f"## Inference throughput (batch {t['batch_size']}, float32 matmul precision "
              f"{t['float32_matmul_precision']}, TF32 {t['tf32_matmul']})", "",
              "| dtype | method | schedule | img/s | speedup | MACs ratio | speedup x MACs ratio | PYRA/ToMe | peak GiB |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in t["rows"]:
            pv = "-" if r["pyra_vs_tome"] is None else f"{r['pyra_vs_tome']:.3f}"
            pm = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
            L.append(f"| {r['dtype']} | {r['method']} | {r['schedule']} | {r['img_per_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['macs_ratio']:.3f} | {100 * r['efficiency']:.0f}% | {pv} | {pm} |")
        L.append("")
    t = rep.get("training")
    if t:
        L += [f"## Training step (batch {t['batch_size']}: forward, backward, AdamW)", "",
              "| dtype | method | schedule | img/s | speedup | peak GiB |", "|---|---|---|---:|---:|---:|"]
        for r in t["rows"]:
            pm = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
            L.append(f"| {r['dtype']} | {r['method']} | {r['schedule']} | {r['img_per_s']:.1f} | {r['speedup']:.2f}x | {pm} |")
        L.append("")
    d = rep.get("data")
    if d:
        L += ["## Data", "", f"- data folder: {rep.get('data_source')}",
              f"- on-device normalisation bit-identical to the CPU's: {d['device_normalise_bit_identical']} "
              f"(table look-up: {d['table_bit_identical']})",
              f"- input pipeline per core at {rep['settings']['image_size']} px: JPEG {d['jpeg_img_per_cpu_s']:.0f}, cached "
              f"{d['cached_img_per_cpu_s']:.0f} img/CPU-s (cached/jpeg: {d['cached_over_jpeg']:.1f}x)", ""]
    r = rep.get("runs")
    if r:
        tc = next(iter((r["training_cost"] or {}).values()), {}) or {}
        L += ["## Short training run, twice (seed 0, trainer.deterministic=true)", "",
              f"`{r['command']}`", "",
              f"- wall time {r['wall_s'][0]:.0f} s / {r['wall_s'][1]:.0f} s; test top-1 {r['test_top1']} on "
              f"{r['test_images']} images; training {tc.get('img_per_s', float('nan')):.1f} img/s with data loading, "
              f"peak memory {tc.get('peak_mem_gib')} GiB",
              f"- deterministic: {r['deterministic']} (metrics identical {r['metrics_identical']}, "
              f"{r['tensors_compared']} exported tensors, differing: {r['tensors_differing'] or 'none'})", ""]
    for k, v in rep["errors"].items():
        L += [f"## {k}: FAILED", "", "```", v[-3000:], "```", ""]
    return "\n".join(L)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU, tiny ViT: the same steps in seconds")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --quick)")
    p.add_argument("--out-dir", default=None, help="default: results/bench (the work folder with --quick)")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--data-root", default=None, help="a prepared VTAB-1k folder to use instead of mock data")
    p.add_argument("--task", default=TASK)
    p.add_argument("--budget-s", type=float, default=450.0, help="skip the steps that would start after this")
    p.add_argument("--steps", nargs="+", default=["throughput", "training", "data", "runs"])
    a = p.parse_args(argv)
    device = a.device or ("cpu" if a.quick else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available (use --quick for the CPU smoke run)")
    if device == "cpu":
        torch.set_num_threads(1)
    cfg = settings(a.quick)
    work = Path(a.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(a.out_dir or (work if a.quick else ROOT / "results" / "bench"))
    t0 = time.perf_counter()
    slug = device_slug(device)
    rep: dict[str, Any] = {"kind": "gpu_check", "device": device_name(device), "device_slug": slug, "quick": a.quick,
                           "backbone": cfg["backbone"], "settings": cfg, "versions": software_versions(),
                           "status": {}, "errors": {}, "wall_s": 0.0,
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save() -> None:
        rep["wall_s"] = time.perf_counter() - t0
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{slug}.json").write_text(json.dumps(rep, indent=1, default=str) + "\n")
        (out_dir / f"{slug}.md").write_text(markdown(rep))

    models: dict = {}
    data: tuple[Path, str] | None = None

    def run_step(name: str) -> None:
        nonlocal models, data
        if time.perf_counter() - t0 > a.budget_s:
            rep["status"][name] = "skipped (time budget)"
            return
        try:
            if name in ("throughput", "training") and not models:
                models = _models(cfg["backbone"])
            if name in ("data", "runs") and data is None:
                data = (Path(a.data_root), "given folder") if a.data_root else prepare_data(cfg, work, a.quick)
                rep["data_source"] = data[1]
            task = a.task if a.data_root else TASK
            if name == "throughput":
                rep[name] = step_throughput(cfg, device, models)
            elif name == "training":
                rep[name] = step_training(cfg, device, models)
            elif name == "data":
                rep[name] = step_data(cfg, device, data[0], task, work)
            elif name == "runs":
                rep[name] = step_runs(cfg, device, data[0], task, work, parallel=a.quick)
            rep["status"][name] = "ok"
        except Exception:  # noqa: BLE001 - record it, go on with the other steps
            rep["status"][name] = "FAILED"
            rep["errors"][name] = traceback.format_exc()
            print(f"[gpu-check] {name} FAILED:\n{rep['errors'][name]}", flush=True)
        save()
        print(f"[gpu-check] {name}: {rep['status'][name]} ({time.perf_counter() - t0:.0f} s)", flush=True)

    for name in a.steps:
        run_step(name)
    print(f"[gpu-check] wrote {out_dir / slug}.md and .json", flush=True)
    if rep["errors"]:
        sys.exit(1)
    return rep


if __name__ == "__main__":
    main()
