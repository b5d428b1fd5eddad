#!/usr/bin/env python
"""How long checking a sweep's jobs takes: ``python -m pyra_bench.sweep dry-run experiment=<name>`` (every job
composed, checked as ``train`` checks it, its run id, record status and GPU-hour estimate) for a large sweep
(``fig2_vit_b``, 399 jobs) against a small one (``table3_vit_b_peft_small``, 19 jobs).

Issue 22's target: the large sweep takes at most 4x the small one's time on the same machine (the work per
job, shared between jobs that differ only in values, is small next to the fixed start-up). Each command runs
in a fresh interpreter with ``--code``'s checkout first on ``PYTHONPATH`` (``--before <another checkout>``
times that one too, in the same rounds), interleaved: every round runs each command once, after one untimed
warm-up round; the medians are reported. A benchmark, not a timed test.

    python scripts/bench_sweep_check.py --rounds 3
    python scripts/bench_sweep_check.py --rounds 3 --before /path/to/older/checkout --out results/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = {"table3_vit_b_peft_small": 19, "fig2_vit_b": 399}  # experiment -> jobs
TARGET = 4.0


def run_once(code: Path, experiment: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pyra_bench.sweep", "dry-run", f"experiment={experiment}"], cwd=code,
                       env=env, capture_output=True, text=True, timeout=3600)
    dt = time.perf_counter() - t0
    if p.returncode != 0 or f"{EXPERIMENTS[experiment]} jobs in the sweep" not in p.stdout:
        raise SystemExit(f"{code}: dry-run experiment={experiment} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return dt


def measure(codes: dict[str, Path], rounds: int) -> dict[str, dict[str, list[float]]]:
    times = {label: {e: [] for e in EXPERIMENTS} for label in codes}
    for r in range(rounds + 1):
        for label, code in codes.items():
            for e in EXPERIMENTS:
                t = run_once(code, e)
                if r:  # round 0: the page cache
                    times[label][e].append(t)
    return times


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def to_markdown(times: dict, rounds: int, machine: str, revs: dict[str, str]) -> str:
    small, large = EXPERIMENTS
    lines = [f"# Checking a sweep's jobs: `sweep dry-run` of {large} ({EXPERIMENTS[large]} jobs) vs {small} "
             f"({EXPERIMENTS[small]} jobs) ({machine})", "",
             f"{cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; {rounds} interleaved rounds "
             f"after one warm-up round (`scripts/bench_sweep_check.py`); whole-process wall seconds, medians. "
             f"Target (issue 22): the large sweep takes at most {TARGET:g}x the small one.", "",
             f"| code | {small} s | {large} s | ratio | per extra job ms |", "|---|---:|---:|---:|---:|"]
    for label, t in times.items():
        s, b = statistics.median(t[small]), statistics.median(t[large])
        per = (b - s) / (EXPERIMENTS[large] - EXPERIMENTS[small]) * 1000
        lines.append(f"| {label} ({revs[label]}) | {s:.1f} | {b:.1f} | {b / s:.2f} | {per:.0f} |")
    return "\n".join(lines) + "\n"


def _rev(code: Path) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--code", type=Path, default=ROOT, help="the checkout to time (default: this one)")
    ap.add_argument("--before", type=Path, default=None, help="another checkout, timed in the same rounds")
    ap.add_argument("--out", type=Path, default=None, help="write sweep_check_<machine>.md / .json into this folder")
    ap.add_argument("--machine", default=platform.node() or "this machine")
    a = ap.parse_args(argv)
    codes = {"after": a.code.resolve(), **({"before": a.before.resolve()} if a.before else {})}
    times = measure(codes, max(1, a.rounds))
    md = to_markdown(times, max(1, a.rounds), a.machine, {k: _rev(v) for k, v in codes.items()})
    print(md)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"sweep_check_{a.machine}.md").write_text(md)
        (a.out / f"sweep_check_{a.machine}.json").write_text(json.dumps(times, indent=2))
    small, large = EXPERIMENTS
    after = times["after"]
    return 0 if statistics.median(after[large]) <= TARGET * statistics.median(after[small]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
