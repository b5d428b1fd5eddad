"""The input contract at the five console entry points: a user-fixable mistake is one message that names
the problem, exit status 2, no traceback, and nothing written.

One row per class of bad input (numbers in the trainer and bench configs, seed, protocol, a misspelt
experiment, every form of operating point, a method's option, data / output / records folders, hub weights
offline, prepare's values). Each row runs the console entry point in this process
(:func:`helpers.cli.run_entry_point`) in an empty folder, which must still be empty afterwards (for
``train`` that means no ``runs``, ``outputs`` or ``multirun`` folder either). The function-level checks
behind each row are tested in ``test_checks.py``, ``test_params_schedules.py``, ``test_input_errors.py`` ...;
this file checks that the entry points keep the contract. ``train`` refuses these before Hydra starts,
without importing Lightning, so the whole file takes seconds.
"""

from __future__ import annotations

import sys

import pytest
from helpers.cli import run_entry_point

TINY = ["backbone=vit_tiny_test"]  # 3 blocks, 17 tokens: builds in milliseconds


def _train():
    from pyra_bench.train import cli

    return cli


def _bench():
    from pyra_bench.bench import cli

    return cli


def _sweep():
    from pyra_bench.sweep import main

    return main


def _tables():
    from pyra_bench.tables import main

    return main


def _prepare():
    from pyra_bench.data.prepare import main

    return main


ENTRY = {"train": _train, "bench": _bench, "sweep": _sweep, "tables": _tables, "prepare": _prepare}
PROG = {"train": "pyra_bench/train.py", "bench": "pyra_bench/bench.py", "sweep": "pyra_bench/sweep.py",
        "tables": "pyra_bench/tables.py", "prepare": "pyra_bench/data/prepare.py"}

# (id, entry point, arguments ({file}: a file in a folder of its own, {elsewhere}: a folder outside the
# working folder), what the message must contain)
CASES = [
    # numbers in the trainer config
    ("train-lr", "train", ["trainer.lr=-1"], "trainer.lr=-1: must be a finite number > 0"),
    ("train-epochs-0", "train", ["trainer.epochs=0"], "trainer.epochs=0: must be a whole number >= 1"),
    ("train-eval-every-0", "train", ["trainer.eval_every=0"], "trainer.eval_every=0: must be a whole number >= 1"),
    ("train-steps-per-epoch-0", "train", ["trainer.max_steps_per_epoch=0"],
     "trainer.max_steps_per_epoch=0: must be null (the whole split) or a whole number >= 1"),
    ("train-workers", "train", ["trainer.num_workers=-2"], "trainer.num_workers=-2: must be a whole number >= 0"),
    ("train-batch-size-0", "train", ["trainer.batch_size=0"], "trainer.batch_size=0: must be a whole number >= 1"),
    ("train-precision", "train", ["trainer.precision=fp99"], "trainer.precision='fp99': not a precision Lightning"),
    ("train-accelerator", "train", ["trainer.accelerator=gpux"],
     "trainer.accelerator='gpux': unknown Lightning accelerator; valid choices: auto, gpu, cpu"),
    # numbers in the bench config
    ("bench-batch-size-0", "bench", [*TINY, "bench.batch_size=0"], "bench.batch_size=0: must be null"),
    ("bench-threads-0", "bench", [*TINY, "bench.threads=0"], "bench.threads=0: must be null"),
    # the peft choices' options (the schema's classes)
    ("train-peft-choice", "train", [*TINY, "peft=nope"], "unknown peft 'nope'; valid choices: adapter, lora, prefix, vpt"),
    ("train-adapter-dim-0", "train", [*TINY, "peft=adapter", "peft.dim=0"],
     "peft.dim=0: must be null (the backbone's adapter_dim: 4 / 8 / 12 for ViT-S / B / L) or a whole number >= 1"),
    ("train-vpt-tokens-0", "train", [*TINY, "peft=vpt", "peft.num_tokens=0"], "peft.num_tokens=0: must be a whole number >= 1"),
    ("train-prefix-dropout", "train", [*TINY, "peft=prefix", "+peft.dropout=0.1"],
     "peft.dropout=0.1: unknown setting of peft=prefix; valid keys: name, num_tokens"),
    # seed, protocol, experiment
    ("train-seed", "train", ["seed=-1"], "seed=-1: must be a whole number >= 0 and < 4294967296"),
    ("train-protocol", "train", ["protocol=tune"], "protocol='tune': unknown protocol; valid choices: final, tuning"),
    ("train-optimized-metric", "train", ["+optimized_metric=top5"],  # conf/hparams_search/optuna.yaml sets it
     "optimized_metric='top5': unknown metric a sweep's job returns; valid choices: null, top1, top1_best"),
    ("train-experiment", "train", ["experiment=tabel2_vit_b"], "unknown experiment 'tabel2_vit_b' (did you mean"),
    ("sweep-experiment", "sweep", ["dry-run", "experiment=tabel2_vit_b"],
     "unknown experiment 'tabel2_vit_b' (did you mean table2_vit_b"),
    ("sweep-seed-epochs", "sweep", ["dry-run", "seed=-1", "trainer.epochs=0"], "2 invalid settings"),
    ("train-multirun-job", "train", ["-m", "trainer.lr=0.001,-1"],
     "1 of the sweep's 2 jobs have invalid settings (nothing was launched"),
    ("train-override-key", "train", ["trainer.lrr=1"], "To append to your config use +trainer.lrr=1"),
    # operating points (schedules are resolved when the model is built: bench builds it, train's run too)
    ("schedule-too-short", "bench", [*TINY, "compression=[1,1]"],
     "has 2 entries but the backbone has 3 blocks (depth 3)"),
    ("schedule-non-integer", "bench", [*TINY, "compression=[1.7,1,1]"], "1.7 is not a whole number of tokens"),
    ("schedule-tome-form", "bench", [*TINY, "compression='tome:4,5'"], "inflection 5.0 of tome:4,5 is outside [-1, 1]"),
    ("schedule-infeasible", "bench", [*TINY, "compression=r99"], "infeasible merging schedule: block 0 has 17 tokens"),
    ("train-budget-number", "train", ["budget=2.0"], "budget=2.0: a number is no operating point: a FLOPs budget "
     "is flops:<fraction>"),
    ("train-flops-budget", "train", ["compression=flops:2"], "a FLOPs budget is a fraction of the backbone's MACs in "
     "(0, 1], got 'flops:2'"),
    ("flops-budget", "bench", [*TINY, "compression=flops:1.5"],
     "a FLOPs budget is a fraction of the backbone's MACs in (0, 1], got 'flops:1.5'"),
    ("method-option", "bench", [*TINY, "+method.kwargs.nonsense=1"], "method 'tome' got unknown options: nonsense"),
    # labelled merge variants (issue 25)
    ("train-merge-split", "train", ["backbone.merge_split=randm"],
     "backbone.merge_split='randm': unknown backbone.merge_split; valid choices: alternate, random"),
    ("merge-site-method", "bench", [*TINY, "method=diffrate", "backbone.merge_site=before_attention"],
     "method 'diffrate' does not merge with ToMe's bipartite matching"),
    # folders
    ("train-data-folder", "train", ["task=cifar100", "data_root={elsewhere}/nowhere"],
     "VTAB-1k data root not found"),
    ("train-results-not-a-folder", "train", ["results_dir={file}/results"], "is a file, not a folder"),
    ("bench-output-not-a-folder", "bench", [*TINY, "bench.output_dir={file}/bench"], "is a file, not a folder"),
    ("tables-out-not-a-folder", "tables", ["out={file}/t"], "out='{file}/t': cannot be created"),
    ("tables-n-resamples-word", "tables", ["paired.n_resamples=abc"],
     "paired.n_resamples='abc': must be a whole number >= 100 (bootstrap resamples)"),
    ("tables-n-resamples-0", "tables", ["paired.n_resamples=0"], "paired.n_resamples=0: must be a whole number >= 100"),
    ("tables-confidence", "tables", ["paired.confidence=1.5"],
     "paired.confidence=1.5: must be a finite number > 0 and < 1"),
    ("tables-non-record", "tables", ["records={elsewhere}/records", "out={elsewhere}/tables"],
     "holds no run record: 1 file(s) that are not run records were not read: {elsewhere}/records/list.json (not a "
     "JSON object)"),
    # hub weights on a machine without network
    ("train-hub-offline", "train", ["backbone=vit_b16_in21k", "backbone.weights=hub"],
     "needs the Hugging Face hub, but HF_HUB_OFFLINE=1 is set"),
    # data.prepare
    ("prepare-jpeg-quality", "prepare", ["tasks=cifar100", "jpeg_quality=0"],
     "jpeg_quality=0: must be a whole number >= 1 and < 101"),
    ("prepare-data-root-file", "prepare", ["tasks=cifar100", "data_root={file}"], "exists and is not a folder"),
    ("prepare-workers", "prepare", ["tasks=cifar100", "workers=-1"], "workers=-1: must be null"),
]


@pytest.fixture
def elsewhere(tmp_path_factory, monkeypatch):
    """A folder outside the working folder: a file there (``{file}``), a records folder holding a JSON list,
    and an empty Hugging Face cache with the hub offline (so hub weights cannot be had)."""
    import huggingface_hub.constants

    base = tmp_path_factory.mktemp("elsewhere")
    (base / "file").write_text("not a folder\n")
    (base / "records").mkdir()
    (base / "records" / "list.json").write_text("[1, 2]\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(base / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return base


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("entry,args,fragment", [pytest.param(e, a, f, id=i) for i, e, a, f in CASES])
def test_bad_input_is_one_message_exit_2_nothing_written(entry, args, fragment, tmp_path, elsewhere, monkeypatch,
                                                         capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    fill = {"file": str(elsewhere / "file"), "elsewhere": str(elsewhere)}
    args = [a.format(**fill) for a in args]
    lightning_before = "lightning" in sys.modules
    code, out, err = run_entry_point(ENTRY[entry](), PROG[entry], args, cwd, monkeypatch, capsys,
                                     env={"HYDRA_FULL_ERROR": "0"})
    text = out + err
    assert code == 2, text[-3000:]
    assert fragment.format(**fill) in err, err[-3000:]
    assert "error:" in err and "Traceback" not in text, text[-3000:]
    assert not list(cwd.iterdir()), "nothing is written (no run, outputs or multirun folder, no failure record)"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["file", "records"], "nor anywhere else"
    if entry in ("train", "sweep") and not lightning_before:  # refused before Lightning's import (seconds)
        assert "lightning" not in sys.modules, "train's and sweep's checks import no Lightning"

