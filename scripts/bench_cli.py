#!/usr/bin/env python
"""How long listing takes: ``pyra-info`` and every entry point's ``--help`` against ``python -c "import torch"``.

A listing (what can be chosen, the options of a command) must finish before torch would have been
imported, so it must never import torch (or timm, Lightning, TFDS). Each command runs as a user types it,
in a fresh interpreter, its output thrown away, with this checkout first on ``PYTHONPATH``: the modules
(``python -m pyra_bench.info``, ``python -m pyra_bench.train --help``, ...) and, where this environment has
them next to the interpreter, the console scripts (``pyra-info``, ``pyra-train --help``, ...).

The commands are timed **interleaved**: every round runs each of them once (in an order rotated by one
every round, so no command always follows the same one), ``--rounds`` rounds after one untimed warm-up
round (the page cache). A command's ratio is the median over rounds of its time over ``import torch``'s
time in the same round, so a shared machine's drift cancels; the medians of the times are printed too.
The script fails (status 1) when a command's ratio is not below 1. No timed test checks this (timings
belong to a benchmark, not to the suite); ``tests/test_info.py`` checks that no listing imports torch.

    python scripts/bench_cli.py                          # 7 rounds, prints the table
    python scripts/bench_cli.py --rounds 9 --out results/bench --machine "2-core VM, shared"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The entry points whose ``--help`` is timed: module -> console script (pyproject.toml [project.scripts]).
ENTRY_POINTS = {"pyra_bench.train": "pyra-train", "pyra_bench.bench": "pyra-bench", "pyra_bench.tables": "pyra-tables",
                "pyra_bench.sweep": "pyra-sweep", "pyra_bench.data.prepare": "pyra-prepare-vtab"}
BASELINE = "python -c 'import torch'"


def commands() -> dict[str, list[str]]:
    """Label -> command line: the baseline, the listings, every ``--help``; console scripts where installed."""
    py = sys.executable
    cmds = {BASELINE: [py, "-c", "import torch"],
            "python -m pyra_bench.info": [py, "-m", "pyra_bench.info"],
            "python -m pyra_bench.info backbones": [py, "-m", "pyra_bench.info", "backbones"]}
    cmds.update({f"python -m {m} --help": [py, "-m", m, "--help"] for m in ENTRY_POINTS})
    bindir = Path(py).parent
    scripts = {"pyra-info": [], **{s: ["--help"] for s in ENTRY_POINTS.values()}}
    for script, args in scripts.items():
        exe = bindir / script
        if exe.is_file():
            cmds[" ".join([script, *args])] = [str(exe), *args]
    return cmds


def time_once(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return dt


def measure(cmds: dict[str, list[str]], rounds: int) -> dict[str, list[float]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("PYRA_PROGRESS", None)
    labels = list(cmds)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(rounds + 1):  # round 0: warm-up, not kept
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:
            dt = time_once(cmds[label], env)
            if r:
                times[label].append(dt)
        if r:
            print(f"round {r}/{rounds}: import torch {times[BASELINE][-1]:.2f} s", file=sys.stderr, flush=True)
    return times


def summarise(times: dict[str, list[float]]) -> list[dict]:
    base = times[BASELINE]
    rows = []
    for label, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        rows.append({"command": label, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                     "ratio_median": statistics.median(ratios), "ratio_max": max(ratios), "times_s": ts})
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def to_markdown(rows: list[dict], rounds: int, machine: str) -> str:
    lines = [f"# Listing and `--help` vs `python -c \"import torch\"` ({machine})", "",
             f"{cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; {rounds} interleaved rounds "
             f"after one warm-up round (`scripts/bench_cli.py`). Ratio: the median over rounds of the command's "
             f"time over `import torch`'s in the same round (< 1: faster than importing torch).", "",
             "| command | median s | min-max s | ratio (median) | ratio (worst round) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| `{r['command']}` | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | "
                     f"{r['ratio_median']:.2f} | {r['ratio_max']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None, help="write cli_<machine>.md / .json into this folder")
    ap.add_argument("--machine", default=platform.node() or "this machine",
                    help="how the results name the machine, e.g. '2-core VM, shared'")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {a.rounds}")
    rows = summarise(measure(commands(), a.rounds))
    text = to_markdown(rows, a.rounds, a.machine)
    print(text)
    if a.out is not None:
        slug = re.sub(r"[^a-z0-9]+", "-", f"cpu {cpu_name()} {os.cpu_count()}cpu".lower()).strip("-")
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"cli_{slug}.md").write_text(text)
        (a.out / f"cli_{slug}.json").write_text(json.dumps(
            {"machine": a.machine, "cpu": cpu_name(), "cpus": os.cpu_count(), "rounds": a.rounds,
             "python": platform.python_version(), "git": _git_rev(), "rows": rows}, indent=1) + "\n")
    slow = [r["command"] for r in rows if r["command"] != BASELINE and r["ratio_median"] >= 1]
    if slow:
        print(f"slower than import torch: {', '.join(slow)}", file=sys.stderr)
    return 1 if slow else 0


def _git_rev() -> str | None:
    if shutil.which("git") is None:
        return None
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout.strip() or None


if __name__ == "__main__":
    raise SystemExit(main())
