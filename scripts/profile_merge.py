#!/usr/bin/env python
"""Where the time of a merged ViT's forward goes: time per component (module hooks with device sync) and
the top operators (``torch.profiler``), for the unmerged model and each method at one schedule. A
diagnostic, not a benchmark: hooks and the profiler add overhead (``scripts/bench_speedup.py`` measures).

    python scripts/profile_merge.py                                   # ViT-B/16, peft vs tome/pyra at high, CPU
    python scripts/profile_merge.py --device cuda --batch-size 512 --schedule low
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("KINETO_LOG_LEVEL", "5")
import torch  # noqa: E402

from pyra_bench.measure import default_batch_size, inference_model, input_spec  # noqa: E402
from pyra_bench.models import build_model  # noqa: E402

COMPONENTS = ["patch_embed", "attention (qkv, SDPA, proj)", "norm1+norm2", "token merging (matching + gather/scatter)",
              "PYRA modulation", "mlp", "other", "whole forward"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def component_times(model, x, device, iters: int = 2) -> dict[str, float]:
    """Seconds per forward spent in each component, from pre/post forward hooks (device sync in each)."""
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

        handles.extend([mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)])

    add(model.patch_embed, "patch_embed")
    for blk in model.blocks:
        add(blk.norm1, "norm1+norm2")
        add(blk.norm2, "norm1+norm2")
        add(blk.attn, "attention (qkv, SDPA, proj)")
        add(blk.mlp, "mlp")
        red = getattr(blk, "token_reducer", None)
        if red is not None:
            add(red, "reduction")
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
    if "reduction" in out:
        out["token merging (matching + gather/scatter)"] = out.pop("reduction") - out.get("PYRA modulation", 0.0)
    out["other"] = out["whole forward"] - sum(v for k, v in out.items() if k != "whole forward")
    return out


def top_ops(model, x, device, top: int = 8) -> list[tuple[str, float]]:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode():
        model(x)
        _sync(device)
        with profile(activities=acts) as prof:
            model(x)
            _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    evs = sorted(prof.key_averages(), key=lambda e: -getattr(e, key, 0))
    total = sum(getattr(e, key, 0) for e in evs) or 1
    return [(e.key, 100 * getattr(e, key, 0) / total) for e in evs[:top]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="vit_b16_in21k")
    p.add_argument("--methods", nargs="+", default=["tome", "pyra"])
    p.add_argument("--schedule", default="high")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    bs = a.batch_size or default_batch_size(device)
    results = {}
    for method, sch in [("peft", None)] + [(m, a.schedule) for m in a.methods]:
        torch.manual_seed(0)
        model = inference_model(build_model(a.backbone, 100, method, sch, drop_path_rate=0.0)).to(device)
        ch, size = input_spec(model)
        x = torch.randn(bs, ch, size, size, device=device)
        results[f"{method}/{sch or 'none'}"] = (component_times(model, x, device), top_ops(model, x, device))
    keys = list(results)
    print(f"# {a.backbone}, batch {bs}, {device} -- ms per forward (share)\n")
    print("| component | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for name in COMPONENTS:
        cells = []
        for k in keys:
            comp = results[k][0]
            v = comp.get(name)
            cells.append("-" if v is None else f"{1e3 * v:.1f} ({100 * v / comp['whole forward']:.1f}%)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nTop operators (self time of one forward):")
    for k in keys:
        print(f"- {k}: " + ", ".join(f"`{op}` {pct:.1f}%" for op, pct in results[k][1]))


if __name__ == "__main__":
    main()
