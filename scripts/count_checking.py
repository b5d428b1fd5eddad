#!/usr/bin/env python
"""The size of the checking code (issue 22): lines of ``schema.py``, ``checks.py``, ``jobs.py``, ``cli.py`` and
the declared method options, each file split by its ``# ----`` section banners, and the package's total.

    python scripts/count_checking.py            # this checkout
    python scripts/count_checking.py --rev ef59c54   # a commit (git show)
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ("pyra_bench/schema.py", "pyra_bench/checks.py", "pyra_bench/jobs.py", "pyra_bench/cli.py",
         "pyra_bench/methods/options.py")


def read(path: str, rev: str | None) -> str:
    if rev is None:
        return (ROOT / path).read_text()
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def package_files(rev: str | None) -> list[str]:
    if rev is None:
        return [p.relative_to(ROOT).as_posix() for p in (ROOT / "pyra_bench").rglob("*.py")]
    out = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "pyra_bench"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return [f for f in out.split() if f.endswith(".py")]


def sections(text: str) -> list[tuple[str, int]]:
    """(section title, lines) in file order; the part before the first banner is ``(top)``."""
    out, title, n, lines = [], "(top)", 0, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("# ----") and i + 2 < len(lines) and lines[i + 2].startswith("# ----"):
            out.append((title, n))
            title, n, i = lines[i + 1].lstrip("# ").strip(), 3, i + 3
            continue
        n, i = n + 1, i + 1
    return [*out, (title, n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default=None, help="a git revision instead of the working tree")
    a = ap.parse_args()
    total = 0
    for f in FILES:
        try:
            text = read(f, a.rev)
        except (subprocess.CalledProcessError, FileNotFoundError):
            continue
        n = len(text.splitlines())
        total += n
        print(f"{f}: {n}")
        for title, k in sections(text):
            if len(sections(text)) > 1:
                print(f"    {k:5d}  {title}")
    package = sum(len(read(f, a.rev).splitlines()) for f in package_files(a.rev))
    print(f"checking code: {total} lines; package pyra_bench: {package} lines")


if __name__ == "__main__":
    main()
