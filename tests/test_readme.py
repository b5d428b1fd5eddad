"""The README as a test: every command of its ``bash`` blocks either runs here, as a subprocess typed as
written, or is listed below with the reason it cannot run on this machine (SLURM, hub weights, VTAB-1k data,
a GPU, the network). A command added to the README without an entry here fails
:func:`test_every_readme_command_runs_here_or_says_why_not`.

The commands that run share one sandbox, in one test (so that it is built once, on one xdist worker): the offline journey of the README (``make demo``,
mock CIFAR-100, ToMe and PYRA on it, ``make tables``) writes the records that the tables commands read.
Records, run folders and tables go to the sandbox through the README's own environment variables
(``PYRA_RESULTS``, ``PYRA_RUNS``, ``PYRA_TABLES``); ``make`` runs in the checkout, ``python -m`` in the
sandbox (relative paths such as ``data_root=data/mock`` land there). The demo runs with
``DEMO_ARGS=trainer=smoke`` (the README's documented two-epoch demo), so that the suite stays within budget.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PY = [sys.executable, "-m"]

#: Commands run by this module (the test that runs each, for the reader).
RUN = {
    "make demo": "test_offline_journey",
    "python -m pyra_bench.data.prepare tasks=cifar100 data_root=data/mock mock_examples=2000":
        "test_offline_journey",
    "python -m pyra_bench.train -m task=cifar100 data_root=data/mock backbone=vit_demo_mnist method=tome,pyra "
    "trainer=smoke": "test_offline_journey",
    "python -m pyra_bench.visualize run=outputs/runs/digits__vit_demo_mnist__pyra__low__seed0 num_images=2 "
    "'blocks=[0,2]'": "test_offline_journey",
    "make tables": "test_offline_journey",
    "python -m pyra_bench.tables metric=best 'tables=[2,3]' 'formats=[md,tex]' figures=false":
        "test_offline_journey/tables",
    "python -m pyra_bench.train --help": "test_listing_commands",
    **{f"python -m pyra_bench.info {what}": "test_listing_commands"
       for what in ("backbones", "methods", "tasks", "experiments", "options", "recipe", "launchers")},
}

_VTAB = "needs the VTAB-1k data (TFDS downloads) and pre-trained ViT weights from the hub"
#: Commands that cannot run here, with the reason (each is reported as a skipped test).
SKIP = {
    "make test": "this test suite itself",
    "python -m pyra_bench.data.prepare tasks=all data_root=data/vtab-1k": "downloads every VTAB task from TFDS "
    "(the mock-data form runs in test_offline_journey)",
    "python -m pyra_bench.data.prepare tasks=[cifar100,dtd] verify=true": "downloads CIFAR-100 and DTD from TFDS",
    "python -m pyra_bench.train task=cifar100 method=pyra": _VTAB,
    "python -m pyra_bench.train task=cifar100 method=tome compression=high": _VTAB,
    "python -m pyra_bench.train task=dtd method=peft backbone=vit_l16_in21k": _VTAB,
    "python -m pyra_bench.train task=cifar100 method=pyra method.kwargs.variant=wd_sigmoid": _VTAB,
    "python -m pyra_bench.sweep dry-run experiment=table2_vit_b": "checks 114 jobs (~40 s of CPU here, issue 22); "
    "tests/test_sweeps.py runs dry-run on smaller sweeps",
    "python -m pyra_bench.sweep summary experiment=table2_vit_b": "checks 114 jobs (~30 s of CPU here, issue 22); "
    "tests/test_sweeps.py runs summary on smaller sweeps",
    "python -m pyra_bench.train -m experiment=table2_vit_b": _VTAB + "; 114 full trainings",
    "python -m pyra_bench.train -m experiment=table2_vit_b hydra/launcher=slurm hydra.launcher.partition=gpu "
    "hydra.launcher.array_parallelism=32 hydra.launcher.timeout_min=720": "needs a SLURM cluster",
    "python -m pyra_bench.train -m experiment=table2_vit_b hydra/launcher=local": "needs GPUs (one job per GPU)",
    "python -m pyra_bench.train hparams_search=optuna task=dtd method=pyra hydra.sweeper.n_trials=40":
        _VTAB + " (tests/test_optuna.py runs two trials on the demo)",
    "cat outputs/runs/multirun/<date>/optimization_results.yaml": "a file of the Optuna sweep above",
    "wandb sync outputs/runs/*/wandb/offline-run-*": "uploads to W&B (needs the network and a login)",
    'python -m pyra_bench.bench "bench.run=outputs/runs/*" bench.device=cuda': "needs a CUDA GPU",
    "python -m pyra_bench.train hydra.searchpath=[file://my_conf] method=mymethod": _VTAB
    + " (tests/test_plugin.py trains the README's plug-in recipe offline)",
    "python -m pyra_bench.train -m hydra.searchpath=[file://my_conf] experiment=table2_vit_b method=tome,pyra,mymethod "
    "seed=0,1": _VTAB + "; 342 full trainings",
    "python -m pyra_bench.tables records=results/runs out=results/tables": "what `make tables` runs (Makefile), "
    "which runs in test_offline_journey",
    **{c: "a placeholder (<run_dir>, <run_id>) for one's own run; the journey runs visualize on the demo's run "
       "(test_offline_journey), tests/test_visualize.py the other forms in process" for c in (
        "python -m pyra_bench.visualize run=outputs/runs/<run_id>",
        "python -m pyra_bench.visualize run=<run_dir> images=val200 num_images=4 'blocks=[0,3]' out=pictures",
        "python -m pyra_bench.visualize run=<run_dir> 'images=[cat.jpg,dog.png]'",
        "python -m pyra_bench.visualize 'run=[<tome_run>,<pyra_run>,<diffrate_run>]' out=compare")},
    "python -m pyra_bench.tables": "the plug-in recipe's tables, after the sweep above (make tables runs the same "
    "command in test_offline_journey)",
}


def readme_commands(text: str | None = None) -> list[str]:
    """Every command of the README's ``bash`` blocks: continuation lines joined, comments and blank lines
    dropped, whitespace normalised."""
    text = README.read_text() if text is None else text
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                out.append(" ".join(line.split()))
    return out


def test_every_readme_command_runs_here_or_says_why_not():
    cmds = readme_commands()
    assert len(cmds) > 20
    unknown = [c for c in cmds if c not in RUN and c not in SKIP]
    assert not unknown, f"README commands neither run by tests/test_readme.py nor listed as skipped: {unknown}"
    stale = [c for c in (*RUN, *SKIP) if c not in cmds]
    assert not stale, f"listed here but no longer in the README: {stale}"


def test_readme_commands_are_parsed_as_typed():
    """The parser itself, on a hand-written block (continuations, comments, quoting kept)."""
    text = "x\n```bash\na b   # c\n\n# only a comment\nd \\\n    e 'f=[1,2]'\n```\n```yaml\nno: 1\n```\n"
    assert readme_commands(text) == ["a b", "d e 'f=[1,2]'"]


@pytest.mark.parametrize("cmd", sorted(SKIP))
def test_commands_that_cannot_run_here(cmd):
    pytest.skip(SKIP[cmd])


# =============================================================================================================
# The commands that run
# =============================================================================================================
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    base = tmp_path_factory.mktemp("readme")
    env = {**os.environ, "PYRA_RESULTS": str(base / "results" / "runs"), "PYRA_RUNS": str(base / "outputs" / "runs"),
           "PYRA_TABLES": str(base / "results" / "tables"), "DEMO_ARGS": "trainer=smoke", "WANDB_MODE": "disabled"}
    for k in ("PYRA_PROGRESS", "HYDRA_FULL_ERROR", "MAKEFLAGS", "MAKELEVEL"):
        env.pop(k, None)
    return base, env


def _run(cmd: str, sandbox, timeout: int = 600) -> subprocess.CompletedProcess:
    """``cmd`` as the README writes it: ``make`` in the checkout, ``python -m`` in the sandbox, stdout and
    stderr not a terminal (a batch log)."""
    base, env = sandbox
    argv = shlex.split(cmd)
    cwd = ROOT if argv[0] == "make" else base
    if argv[:2] == ["python", "-m"]:
        argv = [*PY, *argv[2:]]
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"{cmd}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p


def _journey():
    return [c for c in RUN if RUN[c] == "test_offline_journey"]


@pytest.fixture(scope="module")
def journey(sandbox):
    """The README's offline journey, in its order: {command: completed process}."""
    return {cmd: _run(cmd, sandbox) for cmd in _journey()}


def test_offline_journey(journey, sandbox):
    """``make demo``, mock CIFAR-100, ToMe and PYRA on it, ``make tables``: each exits 0; the records are
    there, the tables hold Table 2 and the figure of the demo backbone; no batch log holds a carriage
    return (a progress bar's frames)."""
    base, _ = sandbox
    assert list(journey) == readme_commands()[readme_commands().index("make demo", 1):][:5]  # the README's order
    runs = base / "results" / "runs"
    names = sorted(p.name for p in runs.glob("*.json"))
    assert names == ["cifar100__vit_demo_mnist__pyra__low__seed0.json", "cifar100__vit_demo_mnist__tome__low__seed0.json",
                     "digits__vit_demo_mnist__pyra__low__seed0.json"], names
    assert "[MOCK DATA]" in journey[_journey()[1]].stdout
    assert (base / "data" / "mock" / "cifar100" / "train800val200.txt").is_file()
    tables = base / "results" / "tables"
    assert (tables / "table2.md").is_file() and "PYRA" in (tables / "table2.md").read_text()
    assert (tables / "fig_vit_demo_mnist.png").stat().st_size > 1000
    assert "ToMe" in (tables / "other_points.md").read_text()
    # visualize on the demo's run: a PNG per image and the per-block numbers, in <run_dir>/visualize
    demo = base / "outputs" / "runs" / "digits__vit_demo_mnist__pyra__low__seed0"
    out = demo / "visualize"
    assert sorted(f.name for f in out.iterdir()) == ["group_sizes.csv", "test_0000.png", "test_0001.png",
                                                      "tokens_per_block.csv", "tokens_per_block.png"]
    from PIL import Image

    for name in ("test_0000.png", "test_0001.png", "tokens_per_block.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 200
    # tokens after each block: 64 patches + the class token, minus the recorded merging schedule
    sched = json.loads((demo / "inference_model.json").read_text())["method_state"]["schedule"]
    rows = list(csv.DictReader((out / "tokens_per_block.csv").open()))
    assert [int(r["tokens"]) for r in rows] == [65 - sum(sched[:i + 1]) for i in range(len(sched))]
    assert all(float(r["patches_kept"]) == 64 and float(r["groups"]) == int(r["tokens"]) - 1 for r in rows)
    sizes = list(csv.DictReader((out / "group_sizes.csv").open()))
    assert sum(int(r["group_size"]) * int(r["groups"]) for r in sizes) == 2 * 64, "each patch in one group"
    assert sum(int(r["groups"]) for r in sizes) == 2 * (65 - sum(sched) - 1)
    for cmd, p in journey.items():
        assert "\r" not in p.stdout + p.stderr, f"{cmd}: carriage returns in a batch log"
    # what a user of `make demo` reads (pyra_bench.console): each Lightning line once, no adverts or
    # unactionable warnings, one line per epoch when not on a terminal, and the run's own log
    text = journey["make demo"].stdout + journey["make demo"].stderr
    for line in ("GPU available:", "TPU available:", "`Trainer.fit` stopped"):
        assert text.count(line) == 1, (line, text)
    assert text.count("Seed set to") <= 1
    assert "💡" not in text and "litlogger" not in text and "litmodels" not in text
    assert "smaller than the logging interval" not in text and "LeafSpec" not in text
    assert "epoch 2/2 | loss " in text
    assert "top-1" in (base / "outputs" / "runs" / "digits__vit_demo_mnist__pyra__low__seed0" / "train.log").read_text()
    # the tables commands of the README on the journey's records (in the sandbox: relative paths)
    for cmd in [c for c in RUN if RUN[c] == "test_offline_journey/tables"]:
        assert "[tables]" in _run(cmd, sandbox).stdout
    assert (tables / "table2.tex").is_file() and (tables / "table3_vs_paper.md").is_file()
    assert "BEST evaluated epoch" in (tables / "table2.md").read_text()  # the metric=best run wrote last


def test_listing_commands(sandbox):
    """``--help`` and every ``info`` listing of the README exit 0 and say what they promise."""
    expect = {"backbones": "vit_b16_in21k", "methods": "pyra", "tasks": "cifar100", "experiments": "table2_vit_b",
              "options": "variant", "recipe": "lr", "launchers": "submitit"}
    for cmd in [c for c in RUN if RUN[c] == "test_listing_commands"]:
        p = _run(cmd, sandbox)
        word = expect.get(cmd.rsplit(" ", 1)[-1], "else low for every compressing method")
        assert word in p.stdout, (cmd, p.stdout[-2000:])
