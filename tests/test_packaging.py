"""The wheel: built from this checkout, installed into a temporary folder and run from outside the checkout.

Configs (``conf/``) and the paper's numbers (``results/paper/paper_tables.csv``) must ship inside the
package (``pyra_bench/conf``, ``pyra_bench/paper``) and every console script must work from the install
(each of :data:`SCRIPTS` is run once, as its installed script; the demo as ``python -m pyra_bench.train``).
One wheel build and install per session (module-scoped fixture); the demo reuses the demo backbone cached
in ``~/.cache/pyra_bench`` (or ``$PYRA_BENCH_CACHE``).
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"pyra-train": "pyra_bench.train:cli", "pyra-bench": "pyra_bench.bench:cli",
           "pyra-tables": "pyra_bench.tables:main", "pyra-prepare-vtab": "pyra_bench.data.prepare:main",
           "pyra-sweep": "pyra_bench.sweep:main", "pyra-info": "pyra_bench.info:main"}


def _source(module: str) -> str:
    return (ROOT / "pyra_bench" / f"{module}.py").read_text()


def _hydra_config_path_is_packaged(module: str) -> bool:
    """Whether the module's ``@hydra.main`` takes its configs from ``paths.CONF_DIR`` (not ``../conf``)."""
    return re.search(r"config_path\s*=\s*str\(\s*(paths\.)?CONF_DIR\s*\)", _source(module)) is not None


needs_train_wiring = pytest.mark.skipif(
    not _hydra_config_path_is_packaged("train"),
    reason="needs lead wiring: @hydra.main(config_path=str(paths.CONF_DIR)) in pyra_bench/train.py")
needs_tables_wiring = pytest.mark.skipif(
    "paths.PAPER_CSV" not in _source("tables") and not re.search(r"from \.paths import .*PAPER_CSV", _source("tables")),
    reason="needs the tables engineer's change: pyra_bench/tables.py reads paths.PAPER_CSV")


def _checkout_files() -> list[str]:
    """The files a build from this checkout sees: tracked plus untracked-but-not-ignored (git), i.e. not
    one's data, runs, virtual environment or conf/local/ settings."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                         check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("wheel")
    src, dist, site = base / "src", base / "dist", base / "site"
    for f in _checkout_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    (src / "conf" / "local").mkdir(parents=True, exist_ok=True)
    (src / "conf" / "local" / "default.yaml").write_text("# one's own cluster settings: must not ship\n")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(dist)], check=True,
                   capture_output=True, timeout=600)
    (wheel,) = dist.glob("pyra_bench-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=600)
    cwd = base / "cwd"
    cwd.mkdir()
    return {"wheel": wheel, "site": site, "cwd": cwd, "base": base}


def _run(install, *args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """A command from a folder outside the checkout, with only the installed package on PYTHONPATH (the
    venv's editable install of a checkout is a meta-path finder after PYTHONPATH: the install wins)."""
    e = {**os.environ, "PYTHONPATH": str(install["site"]), **(env or {})}
    e.pop("PYTHONSAFEPATH", None)
    return subprocess.run(list(args), cwd=install["cwd"], env=e, capture_output=True, text=True, timeout=timeout)


def _script(install, name: str) -> str:
    """An installed console script (``<site>/bin/<name>``), one of :data:`SCRIPTS`."""
    assert name in SCRIPTS
    return str(install["site"] / "bin" / name)


#: Modules whose distribution is named otherwise.
DISTRIBUTIONS = {"hydra": "hydra-core", "sklearn": "scikit-learn", "PIL": "pillow"}
#: Imported by the package, installed by a declared dependency that requires it: module -> that dependency.
PROVIDED = {"numpy": "pandas", "PIL": "torchvision", "huggingface_hub": "timm", "optuna": "hydra-optuna-sweeper"}


def _dist(name: str) -> str:
    return re.split(r"[<>=!~ ;\[(]", name.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_every_third_party_import_is_a_declared_dependency():
    """pip installs what pyproject.toml declares: a module the package imports and no dependency brings
    (scipy, for the paired tables' Wilcoxon test, once) fails on a fresh install."""
    import ast
    from importlib import metadata

    tomllib = pytest.importorskip("tomllib")
    declared = {_dist(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    imported = set()
    for f in [*(ROOT / "pyra_bench").rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = sorted(m for m in imported - {"pyra_bench", "hydra_plugins"} if m not in sys.stdlib_module_names)
    dist = {m: _dist(DISTRIBUTIONS.get(m, m)) for m in third_party}
    assert [m for m in third_party if m not in PROVIDED and dist[m] not in declared] == []
    for module, by in PROVIDED.items():
        assert by in declared and dist.get(module, _dist(module)) in {_dist(r) for r in metadata.requires(by) or []}, \
            (module, by)


def test_wheel_holds_every_module_config_and_the_papers_numbers(install):
    names = set(zipfile.ZipFile(install["wheel"]).namelist())
    files = _checkout_files()
    modules = [f for f in files if f.endswith(".py") and f.startswith(("pyra_bench/", "hydra_plugins/"))]
    configs = [f for f in files if f.startswith("conf/") and f.endswith(".yaml") and not f.startswith("conf/local/")]
    assert modules and configs
    assert [m for m in modules if m not in names] == []  # every sub-package is listed in pyproject.toml
    assert [c for c in configs if f"pyra_bench/{c}" not in names] == []
    assert "pyra_bench/paper/paper_tables.csv" in names and "pyra_bench/py.typed" in names
    # of conf/local/ only the example ships (--help names it); one's own settings stay home
    assert [n for n in names if n.startswith("pyra_bench/conf/local/")] == ["pyra_bench/conf/local/example.yaml"]
    assert not [n for n in names if n.startswith("hydra_plugins/") and n.endswith(".py")
                and n not in modules]  # no ghost packages
    site = install["site"]
    assert filecmp.cmp(site / "pyra_bench" / "paper" / "paper_tables.csv", ROOT / "results" / "paper" / "paper_tables.csv",
                       shallow=False)
    assert all(filecmp.cmp(site / "pyra_bench" / c, ROOT / c, shallow=False) for c in configs)
    assert filecmp.cmp(site / "pyra_bench" / "conf" / "local" / "example.yaml", ROOT / "conf" / "local" / "example.yaml",
                       shallow=False)


def test_installed_package_finds_its_files_and_scripts(install):
    code = ("import importlib.metadata as md, pyra_bench, pyra_bench.paths as p\n"
            "print(pyra_bench.__file__); print(p.CONF_DIR); print(p.PAPER_CSV)\n"
            "eps = [e for e in md.distribution('pyra-bench').entry_points if e.group == 'console_scripts']\n"
            "for e in sorted(eps, key=lambda e: e.name):\n"
            "    print(e.name, e.value, md.distribution('pyra-bench').locate_file(e.module.replace('.', '/') + '.py'))\n")
    p = _run(install, sys.executable, "-c", code)
    assert p.returncode == 0, p.stderr
    module, conf, paper, *scripts = p.stdout.splitlines()
    site = install["site"].resolve()
    assert Path(module).resolve() == site / "pyra_bench" / "__init__.py"  # the installed copy, not the checkout
    assert Path(conf) == site / "pyra_bench" / "conf" and (Path(conf) / "train.yaml").is_file()
    assert Path(paper) == site / "pyra_bench" / "paper" / "paper_tables.csv"
    assert [s.split()[:2] for s in scripts] == [[n, v] for n, v in sorted(SCRIPTS.items())]
    for line in scripts:  # each script's module is the installed one and defines its function
        _, value, origin = line.split()
        assert Path(origin).resolve().is_relative_to(site)
        assert re.search(rf"^def {value.split(':')[1]}\(", Path(origin).read_text(), re.M)
        assert (site / "bin" / line.split()[0]).is_file()


def test_installed_info_script_and_prepare_app(install):
    p = _run(install, _script(install, "pyra-info"), "experiments")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0].startswith("fig2_vit_b ") and "table2_vit_b" in p.stdout
    p = _run(install, _script(install, "pyra-prepare-vtab"), "tasks=digits", "data_root=data", "progress=false")
    assert p.returncode == 0, p.stderr
    assert (install["cwd"] / "data" / "digits" / "meta.json").is_file()


@needs_train_wiring
def test_installed_train_help(install):
    p = _run(install, _script(install, "pyra-train"), "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("pyra-train: train and evaluate")  # the program as it was started
    example = install["site"].resolve() / "pyra_bench" / "conf" / "local" / "example.yaml"
    assert f"start from the example\n  {example} " in p.stdout and example.is_file()  # where it really is
    assert "task: " in p.stdout or "task=" in p.stdout
    assert "cifar100" in p.stdout and "Primary config directory not found" not in p.stderr
    # read from the installed configs and method sources: the recipe, each method's options, the launchers
    assert "trainer.epochs=100" in p.stdout and "method=pyra method.kwargs.variant=full" in p.stdout
    assert "hydra/launcher=slurm" in p.stdout and "experiment=table2_vit_b" in p.stdout


def test_installed_bench_and_sweep_scripts(install):
    """pyra-bench's Hydra help (its configs from the install) and pyra-sweep's. (A sweep's dry-run imports
    torch and timm for the run ids: ~15 s more; tests/test_sweeps.py runs it in-process.)"""
    p = _run(install, _script(install, "pyra-bench"), "--help")
    assert p.returncode == 0, p.stderr
    assert "backbone:" in p.stdout and "vit_b16_in21k" in p.stdout and "\n  bench.device=cpu " in p.stdout
    p = _run(install, _script(install, "pyra-sweep"), "--help")
    assert p.returncode == 0, p.stderr
    assert "{dry-run,summary}" in p.stdout and "experiment=table2_vit_b" in p.stdout


@needs_tables_wiring
def test_installed_tables(install):
    records, out = install["base"] / "records", install["base"] / "tables"
    records.mkdir()
    if (ROOT / "conf" / "tables.yaml").exists():  # the Hydra command line
        args = [f"records={records}", f"out={out}", "figures=false"]
    else:
        args = ["--records", str(records), "--out", str(out), "--no-figures"]
    p = _run(install, _script(install, "pyra-tables"), *args)
    assert p.returncode == 0, p.stderr
    assert "paper's numbers are missing" not in p.stdout + p.stderr
    assert (out / "table2.md").is_file() and "PYRA" in (out / "table2.md").read_text()
