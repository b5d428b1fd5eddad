"""Run lifecycle: a run killed or stopped mid-stage resumes at its last finished epoch and ends where an
uninterrupted run ends; stale state (other settings, corrupt files, another weights source) is never
taken for a result; Trainer options reach the Trainer."""

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.runs import run_config, run_overrides

from pyra_bench.errors import ConfigError, SettingsMismatchError
from pyra_bench.records import read_record

ROOT = Path(__file__).resolve().parent.parent
HELPERS = "helpers.lifecycle_callbacks"
# 4 epochs of 3 steps, evaluated after every epoch; LoRA dropout on, shuffling on: the RNG matters.
RUN = ["task=digits", "backbone=vit_tiny_test", "trainer=smoke", "method=pyra", "compression=low",
       "trainer.epochs=4", "trainer.max_steps_per_epoch=3", "trainer.eval_every=1", "export_inference_model=false",
       "logger=none", "callbacks=none", "verify_images=false"]


def _overrides(tmp_path, *extra):
    return run_overrides(RUN, tmp_path, *extra)


def _cfg(tmp_path, *extra):
    return run_config(RUN, tmp_path, *extra)


def _train(cfg):
    from pyra_bench.train import train_with_retries

    return train_with_retries(cfg)


def _cli(tmp_path, *extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "pyra_bench.train", *_overrides(tmp_path, *extra)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


def _interrupt(name, tmp_path, epoch, signum):
    return [f"+callbacks.{name}._target_={HELPERS}.SignalOnce", f"+callbacks.{name}.epoch={epoch}",
            f"+callbacks.{name}.signum={int(signum)}", f"+callbacks.{name}.marker={tmp_path}/{name}.marker"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's record."""
    tmp = tmp_path_factory.mktemp("reference")
    return _train(_cfg(tmp))


def test_a_run_stopped_and_killed_mid_stage_resumes_at_its_last_epoch(tmp_path, reference, caplog, monkeypatch,
                                                                       capsys):
    """The same command three times: SIGTERM after 1 of 4 epochs (exit 143, nothing recorded), then SIGKILL
    after 3 (a pre-empted node: a process of its own), then to the end. The first and last run in this
    process (the console entry point, then the run function: an interpreter start less each). Each re-run
    starts at the last finished epoch, not at 0, and the run ends with the uninterrupted run's accuracy at
    every evaluated epoch."""
    from helpers.cli import run_entry_point

    from pyra_bench.train import cli

    cmd = [*_interrupt("term", tmp_path, 1, signal.SIGTERM), *_interrupt("kill", tmp_path, 3, signal.SIGKILL),
           "logger=csv"]
    with caplog.at_level(logging.INFO, logger="pyra_bench"):
        code, out, err = run_entry_point(cli, "pyra_bench/train.py", _overrides(tmp_path, *cmd), tmp_path,
                                         monkeypatch, capsys, env={"HYDRA_FULL_ERROR": "0"})
    assert code == 128 + signal.SIGTERM, (out + err + caplog.text)[-3000:]
    assert "interrupted by SIGTERM" in out + err + caplog.text
    assert not list((tmp_path / "results").glob("*.json")), "no record for an unfinished run"
    second = _cli(tmp_path, *cmd)
    assert second.returncode == -signal.SIGKILL, second.stderr[-3000:]
    assert "resuming after epoch 1" in second.stdout + second.stderr
    owner = json.loads((tmp_path / "runs" / reference["run_id"] / ".run.owner.json").read_text())
    assert owner["pid"] != os.getpid(), "the killed process's claim on the run folder is left behind"
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO, logger="pyra_bench"):
        _train(_cfg(tmp_path, *cmd))  # ... and its lock, dropped by the kernel, is taken over
    last_process_s = time.monotonic() - t0
    assert "resuming after epoch 3" in caplog.text
    assert not (tmp_path / "runs" / reference["run_id"] / ".run.owner.json").exists()
    rec = read_record(tmp_path / "results" / f"{reference['run_id']}.json")
    assert rec["metrics"]["test_top1_by_epoch"] == reference["metrics"]["test_top1_by_epoch"]
    assert rec["metrics"]["test_top1"] == reference["metrics"]["test_top1"]
    # the record accounts for the whole run: every epoch of the three processes (1 + 2 + 1), timed without
    # each process's first epoch (its warm-up: epochs 1, 2 and 4 -> only epoch 3 timed), its wall time
    # beyond the last process's own, and two resumes
    cost = rec["training_cost"]["train"]
    assert (cost["epochs_run"], cost["processes"], cost["epochs_timed"]) == (4, 3, 1)
    assert rec["resumes"] == 2 and rec["wall_time_s"] > last_process_s + 0.2
    # one metrics curve, every training step once, every epoch in it
    (curve,) = (tmp_path / "runs" / reference["run_id"] / "logs").glob("version_*/metrics.csv")
    assert curve.parent.name == "version_0"
    rows = list(csv.DictReader(curve.open()))
    for key in ("train/acc", "test/top1"):
        steps = [int(float(r["step"])) for r in rows if r.get(key)]
        assert len(steps) == 4 and steps == sorted(set(steps)), (key, rows)  # once per epoch, in order
    assert {int(float(r["epoch"])) for r in rows if r.get("epoch")} == {0, 1, 2, 3}


def test_a_retried_transient_failure_resumes_the_same_way(tmp_path, reference, caplog):
    fail = [f"+callbacks.fail._target_={HELPERS}.FailOnce", "+callbacks.fail.epoch=2",
            f"+callbacks.fail.marker={tmp_path}/fail.marker", "retries=1"]
    with caplog.at_level(logging.INFO, logger="pyra_bench"):
        rec = _train(_cfg(tmp_path, *fail))
    assert "retry 1 of 1" in caplog.text and "resuming after epoch 2" in caplog.text
    assert rec["metrics"]["test_top1_by_epoch"] == reference["metrics"]["test_top1_by_epoch"]


def test_a_finished_stage_made_with_other_settings_is_an_error(tmp_path):
    """The reported case: 12 epochs finished, re-run as 4 epochs -> the old stage is not taken for it."""
    first = _train(_cfg(tmp_path, "trainer.epochs=2"))
    with pytest.raises(SettingsMismatchError, match=r"(?s)results.*trainer.epochs: 2 then, 3 now.*force=true"):
        _train(_cfg(tmp_path, "trainer.epochs=3"))  # the record
    (tmp_path / "results" / f"{first['run_id']}.json").unlink()
    with pytest.raises(SettingsMismatchError, match=r"stages/train.json was made with other settings: trainer.epochs"):
        _train(_cfg(tmp_path, "trainer.epochs=3"))  # the finished stage
    rec = _train(_cfg(tmp_path, "trainer.epochs=3", "force=true"))
    assert sorted(rec["metrics"]["test_top1_by_epoch"]) == ["1", "2", "3"]


def test_a_record_of_a_random_backbone_is_not_taken_for_a_pretrained_run(tmp_path):
    from safetensors.torch import save_file

    from pyra_bench.models import create_backbone, get_backbone

    _train(_cfg(tmp_path, "trainer.epochs=1", "trainer.warmup_epochs=0"))  # backbone.weights=none: random initialisation
    weights = tmp_path / "tiny.safetensors"
    state = create_backbone(get_backbone("vit_tiny_test"), 10).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    with pytest.raises(SettingsMismatchError, match=r"weights.source: 'none' then, 'file' now"):
        _train(_cfg(tmp_path, "trainer.epochs=1", "trainer.warmup_epochs=0", f"backbone.weights={weights}"))


def test_a_corrupt_record_is_redone_not_skipped(tmp_path, caplog):
    first = _train(_cfg(tmp_path, "trainer.epochs=1", "trainer.warmup_epochs=0"))
    path = tmp_path / "results" / f"{first['run_id']}.json"
    path.write_text(path.read_text()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="pyra_bench"):
        again = _train(_cfg(tmp_path, "trainer.epochs=1", "trainer.warmup_epochs=0"))
    assert again["status"] == "completed" and str(path) in caplog.text
    assert read_record(path)["metrics"]["test_top1"] == again["metrics"]["test_top1"]
    assert path.with_name(path.name + ".corrupt").exists()


def test_a_corrupt_checkpoint_is_set_aside_and_its_stage_trained_again(tmp_path, caplog, reference):
    stop = _interrupt("stop", tmp_path, 2, signal.SIGTERM)
    from pyra_bench.lifecycle import RunInterrupted

    with pytest.raises(RunInterrupted):
        _train(_cfg(tmp_path, *stop))
    ckpt = next((tmp_path / "runs").glob("*/ckpt/train/last.ckpt"))
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # e.g. a node died while the file system was syncing
    with caplog.at_level(logging.INFO, logger="pyra_bench"):
        rec = _train(_cfg(tmp_path, *stop))
    assert "not a readable checkpoint" in caplog.text and "resuming" not in caplog.text
    assert ckpt.with_name("last.ckpt.corrupt").exists()
    assert rec["metrics"]["test_top1_by_epoch"] == reference["metrics"]["test_top1_by_epoch"]


def test_any_trainer_option_reaches_the_trainer_and_a_misspelt_one_is_refused(tmp_path):
    out = tmp_path / "trainer.json"
    rec = _train(_cfg(tmp_path, "trainer.epochs=1", "trainer.warmup_epochs=0", "+trainer.gradient_clip_val=1.0",
                      "+trainer.accumulate_grad_batches=2", f"+callbacks.spy._target_={HELPERS}.RecordTrainer",
                      f"+callbacks.spy.out={out}"))
    assert json.loads(out.read_text()) == {"gradient_clip_val": 1.0, "accumulate_grad_batches": 2}
    assert rec["config"]["trainer"]["gradient_clip_val"] == 1.0
    cfg = _cfg(tmp_path / "bad", "+trainer.gradient_clip_vall=1.0")
    with pytest.raises(ConfigError, match="trainer.gradient_clip_vall is neither .*did you mean gradient_clip_val"):
        _train(cfg)
    with pytest.raises(ConfigError, match="trainer.max_epochs is set by pyra_bench; use trainer.epochs"):
        _train(_cfg(tmp_path / "bad", "+trainer.max_epochs=3"))
    assert not (tmp_path / "bad").exists(), "nothing is written before the inputs are checked"


def test_signal_handlers_leave_someone_elses_alone():
    """Under submitit, its SIGUSR2 requeue handler and SIGTERM bypass stay in place (one requeue path)."""
    from pyra_bench.lifecycle import RunInterrupted, handle_signals

    def theirs(signum, frame):
        pass

    old = signal.signal(signal.SIGUSR2, theirs)
    try:
        with handle_signals():
            assert signal.getsignal(signal.SIGUSR2) is theirs
            with pytest.raises(RunInterrupted) as e:
                os.kill(os.getpid(), signal.SIGUSR1)
            assert e.value.exit_code == 128 + signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR2, old)
