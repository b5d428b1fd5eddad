"""Where pyra_bench finds its own files: the Hydra configs (and the groups a command line picks from), the
paper's published numbers, the user cache.

In a checkout they live at the repository's top level (``conf/``, ``results/paper/``); an installed wheel
carries them inside the package. Every entry point asks here, never computes a path of its own.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE_DIR.parent


def _first_existing(*candidates: Path) -> Path:
    return next((c for c in candidates if c.exists()), candidates[-1])


#: The Hydra config folder (``train.yaml``, ``bench.yaml`` and the config groups).
CONF_DIR: Path = _first_existing(PACKAGE_DIR / "conf", _CHECKOUT / "conf")
#: The config groups of ``conf/train.yaml`` whose choices a ``train`` or ``sweep`` command line names
#: (``method=tome``), checked before Hydra starts (:mod:`pyra_bench.cli`).
TRAIN_GROUPS = ("task", "method", "peft", "backbone", "trainer", "logger", "callbacks", "experiment")
#: The paper's Tables 2-8 as transcribed by ``scripts/transcribe_paper.py``.
PAPER_CSV: Path = _first_existing(PACKAGE_DIR / "paper" / "paper_tables.csv",
                                  _CHECKOUT / "results" / "paper" / "paper_tables.csv")


def user_cache_dir() -> Path:
    """pyra_bench's cache (demo backbone, image stamps and caches, weight hashes): ``$PYRA_BENCH_CACHE``
    (or ``$PYRA_CACHE``), else ``~/.cache/pyra_bench``."""
    import os

    return Path(os.environ.get("PYRA_BENCH_CACHE") or os.environ.get("PYRA_CACHE")
                or Path.home() / ".cache" / "pyra_bench").expanduser()
