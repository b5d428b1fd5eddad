"""End to end on tiny configs: every registered method trains, records appear, runs resume, bad input fails fast."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pyra_bench.errors import InputError
from pyra_bench.export import load_inference_model
from pyra_bench.factory import make_datamodule
from pyra_bench.methods import METHODS
from pyra_bench.records import atomic_write_json, iter_records, read_record

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=[
            "task=digits", "backbone=vit_tiny_test", "trainer=smoke", "logger=csv",
            f"results_dir={tmp_path}/results", f"runs_root={tmp_path}/runs",
            "export_inference_model=false", *overrides])


def _train(cfg):
    from pyra_bench.train import train

    return train(cfg)


# spvit: the tiny backbone's selectors alone cost ~6% of its MACs, so "low" would keep one token.
COMPRESSION = {"peft": "none", "spvit": "flops:0.7", "diffrate": "flops:0.8"}


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_and_writes_a_record(tmp_path, method, umask):
    umask(0o022)
    cfg = _cfg(tmp_path, f"method={method}", f"compression={COMPRESSION.get(method, 'low')}",
               "export_inference_model=true")
    rec = _train(cfg)
    assert rec["status"] == "completed"
    path = Path(cfg.results_dir) / f"{rec['run_id']}.json"
    back = read_record(path)
    assert back["method"] == method and back["task"] == "digits" and back["backbone"] == "vit_tiny_test"
    assert 0.0 <= back["metrics"]["test_top1"] <= 100.0
    assert back["metrics"]["test_top1_by_epoch"], "every evaluated epoch is recorded"
    assert back["params"]["trainable"] > 0 and back["flops"]["gmacs"] > 0
    assert back["config"]["method"]["name"] == method
    assert iter_records([cfg.results_dir])[0]["run_id"] == rec["run_id"]
    assert back["metrics"]["test_images"] == 797  # the whole digits test split
    # the exported inference model (LoRA merged) reloads on its own and scores what the run reported
    model = load_inference_model(Path(cfg.run_dir))
    assert not any(".lora_" in k for k in model.state_dict())
    correct = n = 0
    with torch.no_grad():
        for x, y in make_datamodule(cfg).test_dataloader():
            correct += int((model(x).argmax(-1) == y).sum())
            n += len(y)
    assert n == 797 and abs(100.0 * correct / n - back["metrics"]["test_top1"]) <= 100.0 / n + 1e-9
    # training cost per trained stage: smoke trainer = 2 steps of batch 8 per epoch, the first epoch untimed
    assert back["training_cost"], "every method trains at least one stage"
    for stage, c in back["training_cost"].items():
        assert c["epochs_timed"] == max(1, c["epochs_run"] - 1), stage
        assert c["images_timed"] == 2 * 8 * c["epochs_timed"], stage
        assert c["img_per_s"] == pytest.approx(c["images_timed"] / c["seconds_timed"], rel=1e-2)
        assert c["peak_mem_gib"] is None and c["device"]  # CPU
    # every file the run wrote follows the umask (0644 under 022), tensors included (safetensors' own writer
    # leaves 0600), and no temporary file is left
    files = [f for d in (Path(cfg.run_dir), Path(cfg.results_dir)) for f in d.rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files if f.stat().st_mode & 0o777 != 0o644} == {}
    assert not [f for f in files if f.name.endswith(".tmp")]


def test_rerun_skips_a_finished_run(tmp_path, caplog):
    import logging

    cfg = _cfg(tmp_path, "method=pyra", "compression=low", "trainer.epochs=2", "trainer.eval_every=1")
    rec = _train(cfg)
    assert sorted(rec["metrics"]["test_top1_by_epoch"]) == ["1", "2"]
    with caplog.at_level(logging.INFO, logger="pyra_bench"):
        assert _train(cfg)["status"] == "skipped"
    assert "made with the same settings; skipping" in caplog.text


def test_atomic_record_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    target = tmp_path / "r.json"

    class Boom(Exception):
        pass

    def exploding_dumps(obj, **kw):
        raise Boom

    monkeypatch.setattr(json, "dumps", exploding_dumps)
    with pytest.raises(Boom):
        atomic_write_json(target, {"x": 1})
    assert not target.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("override,match", [
    ("compression=r999", "infeasible merging schedule"),
    ("backbone.weights=/nonexistent/ViT-B_16.npz", "weights file not found"),
    ("method.kwargs.variant=nope", "valid choices"),
    ("+method.kwargs.nonsense=1", "unknown options: nonsense"),
    ("peft.init=zeros", "peft.init=.zeros.*valid choices: standard, authors"),
])
def test_bad_input_fails_before_training(tmp_path, override, match):
    cfg = _cfg(tmp_path, "method=pyra", override)
    with pytest.raises(InputError, match=match):
        _train(cfg)
    assert not (tmp_path / "runs").exists(), "nothing is written before the inputs are checked"


def test_missing_data_root_names_the_prepare_command(tmp_path):
    cfg = _cfg(tmp_path, "task=cifar100", "method=tome", f"data_root={tmp_path}/nowhere")
    with pytest.raises(FileNotFoundError, match="pyra_bench.data.prepare"):
        _train(cfg)


def test_corrupt_image_fails_before_training(tmp_path):
    from pyra_bench.data import CorruptImageError, write_digits_folder

    write_digits_folder(tmp_path / "vtab")
    bad = tmp_path / "vtab" / "digits" / "images" / "train800val200" / "000003.jpg"
    bad.write_bytes(bad.read_bytes()[:60])
    cfg = _cfg(tmp_path, "method=tome", "task.source=folder", f"data_root={tmp_path}/vtab")
    with pytest.raises(CorruptImageError, match="000003.jpg"):
        _train(cfg)
    assert not (tmp_path / "runs").exists(), "nothing is written before the inputs are checked"


def test_command_line_prints_bad_input_without_a_traceback(tmp_path, monkeypatch, capsys):
    """The CLI turns an input error into one message and exit status 2 (no traceback to read through)."""
    from helpers.cli import run_entry_point

    from pyra_bench.train import cli

    code, _, err = run_entry_point(cli, "pyra_bench/train.py", [
        "task=cifar100", "backbone=vit_tiny_test", "method=tome", f"data_root={tmp_path}/nowhere",
        f"results_dir={tmp_path}/results", f"runs_root={tmp_path}/runs"], tmp_path, monkeypatch, capsys,
        env={"HYDRA_FULL_ERROR": "0"})
    assert code == 2, err[-2000:]
    assert "pyra_bench.train: error: VTAB-1k data root not found" in err
    assert "python -m pyra_bench.data.prepare tasks=cifar100" in err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir()), "nothing is written (no run folder, no Hydra folder, no failure record)"


def test_unknown_group_option_lists_choices():
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        with pytest.raises(ConfigCompositionException, match="Available options"):
            compose("train", overrides=["method=tomme"])


def test_chained_runs_stop_after_a_stage_and_go_on(tmp_path, caplog):
    """A multi-stage method as chained runs: stop after `lora`, go on in a second invocation; a third run
    (another run folder) starts from the first run's `prune` stage through init_from."""
    import logging

    caplog.set_level(logging.INFO, logger="pyra_bench")
    cfg = _cfg(tmp_path, "method=spvit", "compression=flops:0.7", "stop_after=lora")
    out = _train(cfg)
    stages = Path(cfg.run_dir) / "stages"
    assert out["status"] == "stopped" and sorted(p.name for p in stages.iterdir()) == ["lora.json", "lora.safetensors"]
    assert not iter_records([cfg.results_dir])
    rec = _train(_cfg(tmp_path, "method=spvit", "compression=flops:0.7"))
    assert rec["status"] == "completed" and "stage 'lora' already finished" in caplog.text
    assert sorted(p.stem for p in stages.glob("*.json")) == ["lora", "prune", "retrain"]
    assert sorted(rec["training_cost"]) == ["lora", "prune", "retrain"] or \
        sorted(rec["training_cost"]) == ["lora", "retrain"]  # the restored stage's cost too
    caplog.clear()
    other = _cfg(tmp_path, "method=spvit", "compression=flops:0.7", f"init_from={stages}/prune.json",
                 f"results_dir={tmp_path}/results2", f"run_dir={tmp_path}/run2")
    rec2 = _train(other)
    assert rec2["status"] == "completed" and "stage 'prune' already finished" in caplog.text
    assert "'lora'" not in caplog.text
    assert sorted(p.stem for p in (tmp_path / "run2" / "stages").glob("*.json")) == ["retrain"]
    assert rec2["method_state"]["keep"] == rec["method_state"]["keep"]


@pytest.mark.parametrize("override,match", [
    ("stop_after=prune", "its stages: train"),
    ("init_from=/nonexistent/lora.json", "no such stage file"),
])
def test_bad_chaining_options_fail_before_training(tmp_path, override, match):
    cfg = _cfg(tmp_path, "method=tome", override)
    with pytest.raises(InputError, match=match):
        _train(cfg)
    assert not (tmp_path / "runs").exists(), "nothing is written before the inputs are checked"


def test_ddp_run_evaluates_every_test_image_exactly_once(tmp_path):
    """Multi-device training through Lightning's DDP (2 CPU processes, gloo): the run completes, and its
    top-1 covers the 797 test images once each (Lightning's default sampler would pad to 798 with a
    repeat); the exported model, evaluated in one process, reproduces it."""
    p = subprocess.run([sys.executable, "-m", "pyra_bench.train", "backbone=vit_tiny_test", "trainer=smoke",
                        "trainer.epochs=1", "trainer.warmup_epochs=0",
                        "logger=csv", "method=pyra", "compression=low", "trainer.accelerator=cpu",
                        "trainer.devices=2", "trainer.strategy=ddp", f"results_dir={tmp_path}/results",
                        f"run_dir={tmp_path}/run"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (rec_path,) = Path(tmp_path, "results").glob("*.json")
    rec = read_record(rec_path)
    assert rec["metrics"]["test_images"] == 797
    model = load_inference_model(tmp_path / "run")
    cfg = _cfg(tmp_path, "method=pyra", "compression=low")
    with torch.no_grad():
        hits = [(model(x).argmax(-1) == y) for x, y in make_datamodule(cfg).test_dataloader()]
    acc = 100.0 * float(torch.cat(hits).float().mean())
    assert abs(acc - rec["metrics"]["test_top1"]) <= 100.0 / 797 + 1e-9


def test_loading_an_inference_model_that_is_missing_or_does_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    from pyra_bench.models import CheckpointError

    with pytest.raises(InputError, match="no exported inference model"):
        load_inference_model(tmp_path)
    cfg = _cfg(tmp_path, "method=tome", "compression=low", "export_inference_model=true")
    _train(cfg)
    run_dir = Path(cfg.run_dir)
    state = load_file(str(run_dir / "inference_model.safetensors"))
    state.pop("head.weight")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, str(bad / "inference_model.safetensors"))
    (bad / "inference_model.json").write_text((run_dir / "inference_model.json").read_text())
    with pytest.raises(CheckpointError, match=r"(?s)does not fit .*Missing key.*head.weight"):
        load_inference_model(bad)
    (bad / "inference_model.json").write_text('{"weights": 1}')
    with pytest.raises(CheckpointError, match="not a pyra_bench inference model"):
        load_inference_model(bad)
    torch.save({"state_dict": {}}, tmp_path / "old.pt")
    with pytest.raises(InputError, match="older pyra_bench .* not loaded, since unpickling can run code"):
        load_inference_model(tmp_path / "old.pt")


def test_retries_give_up_and_bad_input_is_never_retried(tmp_path, monkeypatch):
    """(A retried failure resumes: tests/test_lifecycle.py.) retries=0 gives up at once; bad input is not
    retried at all."""
    import lightning as L

    from pyra_bench import train as train_mod

    calls = []

    def failing_fit(self, *a, **kw):
        calls.append(kw.get("ckpt_path"))
        raise RuntimeError("CUDA error: an illegal memory access (simulated)")

    monkeypatch.setattr(L.Trainer, "fit", failing_fit)
    with pytest.raises(RuntimeError, match="simulated"):
        train_mod.train_with_retries(_cfg(tmp_path, "method=pyra", "compression=low", "retries=0"))
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(InputError):
        train_mod.train_with_retries(_cfg(tmp_path, "method=pyra", "compression=r999", "retries=3"))
    assert calls == []


def test_help_lists_every_group_option_and_the_operating_points():
    """--help shows the groups, the paper's recipe (the values of conf/trainer/paper.yaml), every registered
    method with each of its options and defaults (as the registry gives them), how to pick an experiment
    and the hydra/launcher choices -- not the demo's composed config. In a process of its own, to see that
    it imports neither Lightning nor torch nor timm (it stays fast)."""
    import re

    from omegaconf import OmegaConf

    from pyra_bench import info

    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "pyra_bench.train", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    # the built-in methods (a plug-in that another test registered in this process is no choice of the app)
    builtin = sorted(f.stem for f in (ROOT / "conf" / "method").glob("*.yaml"))
    assert builtin == sorted(n for n in METHODS.names() if n != "mymethod")
    assert f"method: {', '.join(builtin)}" in out
    assert "task: caltech101, cifar100," in out and "sun397, svhn" in out
    assert "compression=none | low | high | r<N>" in out
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not imported & {"lightning", "torch", "timm"}, sorted(imported & {"lightning", "torch", "timm"})

    recipe = {f"trainer.{k}": v for k, v in OmegaConf.load(ROOT / "conf" / "trainer" / "paper.yaml").items()}
    recipe.update({f"peft.{k}": v for k, v in OmegaConf.load(ROOT / "conf" / "peft" / "lora.yaml").items()})
    for key in ("trainer.epochs", "trainer.warmup_epochs", "trainer.batch_size", "trainer.lr", "trainer.weight_decay",
                "trainer.warmup_lr", "trainer.min_lr", "trainer.drop_path", "peft.dropout", "trainer.precision"):
        shown = re.search(rf"^  {re.escape(key)}=(\S+)", out, re.M)
        assert shown, key
        value = OmegaConf.create(f"v: {shown.group(1)}").v  # as YAML reads it: 1.0e-3 == 0.001
        assert (float(value) == float(recipe[key])) if isinstance(recipe[key], float) else value == recipe[key], key
    assert "== The paper's recipe (trainer=paper) ==" in out and "AdamW" in out.split("recipe (trainer=paper)")[1]
    for name in builtin:
        assert re.search(rf"^  {name} +\S", out, re.M), name  # the method and its description
        opts = info.method_options(name)  # the config's kwargs, then the declared options (methods/options.py)
        assert opts or f"method={name} " in out
        for key, default, _ in opts:
            assert re.search(rf"^  method={name} method\.kwargs\.{key}={re.escape(default)}( |$)", out, re.M), (name, key)
    for name, _ in info.experiments():
        assert re.search(rf"^  {name} +\S", out, re.M), name
    assert "-m experiment=table2_vit_b" in out
    launchers = sorted(p.stem for p in (ROOT / "conf" / "hydra" / "launcher").glob("*.yaml"))
    assert {"local", "slurm", "submitit"} <= set(launchers)
    for name in ["basic", *launchers]:
        assert re.search(rf"^  hydra/launcher={name} +\S", out, re.M), name  # with its description
    assert "== Config ==" not in out and "lr: 0.003" not in out  # not the demo's composed config
    assert "--cfg job" in out


def test_mixed_precision_run(tmp_path):
    """trainer.precision=bf16-mixed (Lightning autocast; the proportional-attention bias follows q's dtype)."""
    rec = _train(_cfg(tmp_path, "method=pyra", "compression=low", "trainer.precision=bf16-mixed"))
    assert rec["status"] == "completed" and rec["config"]["trainer"]["precision"] == "bf16-mixed"
    assert 0.0 <= rec["metrics"]["test_top1"] <= 100.0 and rec["metrics"]["test_images"] == 797


def test_throughput_measured_after_training_on_the_training_device(tmp_path):
    rec = _train(_cfg(tmp_path, "method=tome", "compression=low", "measure_throughput=true",
                      "throughput.warmup_s=0", "throughput.duration_s=0.02"))
    tp = rec["throughput"]
    assert tp["img_per_s"] > 0 and tp["device_type"] == "cpu" and tp["batch_size"] == 8  # CPU default
    assert tp["lora_merged"] and tp["image_size"] == 32


def test_wandb_logs_offline_one_run_per_pyra_run(tmp_path, monkeypatch):
    """logger=wandb works without the network (offline), the three stages of SPViT share one W&B run,
    the run is finished when train returns (so the next run of a multirun starts its own), and its
    summary, read back from the offline run file, holds the record's top-1, params % and MACs."""
    from helpers.wandb_file import finished_run_file, summary_and_runs

    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = _cfg(tmp_path, "method=spvit", "compression=flops:0.7", "logger=wandb")
    rec = _train(cfg)
    assert rec["status"] == "completed" and wandb.run is None
    runs = list((Path(cfg.run_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    assert list(runs[0].glob("*.wandb")), "the offline run holds its log"
    wandb.teardown()  # stop the W&B service: it writes the run file asynchronously
    summary, wb_runs = summary_and_runs(finished_run_file(Path(cfg.run_dir) / "wandb"))
    record = read_record(Path(cfg.results_dir) / f"{rec['run_id']}.json")
    assert summary["top1"] == pytest.approx(record["metrics"]["test_top1"]) and summary["eval_split"] == "test"
    assert summary["params/paper_pct"] == pytest.approx(record["params"]["paper_pct"])
    assert summary["params/trainable"] == record["params"]["trainable"]
    assert summary["gmacs"] == pytest.approx(record["flops"]["gmacs"]) and record["flops"]["gmacs"] > 0
    assert summary["run_id"] == record["run_id"] and wb_runs and wb_runs[0].job_type == "train"


def test_tuning_protocol_trains_on_train800_and_evaluates_val200(tmp_path):
    rec = _train(_cfg(tmp_path, "method=tome", "compression=low", "protocol=tuning"))
    assert rec["run_id"].endswith("__tune") and rec["protocol"] == "tuning"
    m = rec["metrics"]
    assert m["test_top1"] is None and m["val_images"] == 200 and 0 <= m["val_top1"] <= 100
    assert rec["config"]["protocol"] == "tuning"
    from pyra_bench.tables import records_frame

    assert records_frame([rec]).empty, "tuning runs never enter the paper's tables"


def test_a_record_made_with_other_settings_is_not_taken_for_this_run(tmp_path):
    """Re-running with a changed hyperparameter (same run id) must not silently skip; run_tag keeps both."""
    _train(_cfg(tmp_path, "method=pyra", "compression=low"))
    with pytest.raises(InputError, match=r"(?s)other settings.*trainer.lr: 0.001 then, 0.01 now.*run_tag"):
        _train(_cfg(tmp_path, "method=pyra", "compression=low", "trainer.lr=0.01"))
    # settings that only change where/how fast it runs do not count
    assert _train(_cfg(tmp_path, "method=pyra", "compression=low", "trainer.num_workers=1"))["status"] == "skipped"
    tagged = _train(_cfg(tmp_path, "method=pyra", "compression=low", "trainer.lr=0.01", "run_tag=lr0.01"))
    assert tagged["status"] == "completed" and tagged["run_id"].endswith("__lr0.01")
    assert len(iter_records([tmp_path / "results"])) == 2


def test_force_retrains_from_scratch(tmp_path):
    cfg = _cfg(tmp_path, "method=tome", "compression=low")
    first = _train(cfg)
    stage = Path(cfg.run_dir) / "stages" / "train.safetensors"
    t0 = stage.stat().st_mtime_ns
    again = _train(_cfg(tmp_path, "method=tome", "compression=low", "force=true"))
    assert again["status"] == "completed" and stage.stat().st_mtime_ns > t0, "force=true trained again"
    assert again["metrics"]["test_top1_by_epoch"] == first["metrics"]["test_top1_by_epoch"], "same seed, same run"


def test_demo_backbone_is_not_pretrained_before_the_schedule_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRA_BENCH_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, "backbone=vit_demo_mnist", "method=tome", "compression=r999")
    with pytest.raises(InputError, match="infeasible merging schedule"):
        _train(cfg)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_input_checks_build_the_model_on_the_meta_device_unless_its_operating_point_is_timed(tmp_path, monkeypatch):
    """pipeline.check builds the model only for its structure: on the meta device (no memory, no weight
    initialisation), the same parameter names and shapes as the real build; a ``speedup:`` operating point
    is timed on real models, so that one is built for real."""
    import torch

    from pyra_bench import factory

    cfg = _cfg(tmp_path, "method=pyra", "compression=low")
    abstract = factory.make_model(cfg, 10, pretrained=False, checkpoint=None, abstract=True)
    real = factory.make_model(cfg, 10, pretrained=False, checkpoint=None)
    assert all(p.is_meta for p in abstract.parameters()) and not any(p.is_meta for p in real.parameters())
    assert {n: p.shape for n, p in abstract.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert abstract.pyra_method.schedule == real.pyra_method.schedule

    devices = []
    monkeypatch.setattr("pyra_bench.models.build_model", lambda *a, **k: devices.append(torch.empty(0).device))
    for compression in ("flops:0.5", "speedup:1.5"):
        factory.make_model(_cfg(tmp_path, "method=tome", f"compression={compression}"), 10, False, None, abstract=True)
    assert [d.type for d in devices] == ["meta", "cpu"]


def test_the_trainer_is_the_class_trainer_target_names_with_the_recipe_kept_apart(tmp_path):
    """``trainer._target_`` is instantiated (a Trainer class of one's own, with an option Lightning lacks);
    the recipe keys never reach it; a target that does not import and an option the class lacks are refused
    by name."""
    from pyra_bench import factory
    from pyra_bench.errors import ConfigError

    cfg = _cfg(tmp_path, "trainer._target_=helpers.trainers.TaggedTrainer", "+trainer.tag=mine",
               "+trainer.gradient_clip_val=0.5")
    factory.check_trainer_options(cfg)
    trainer = factory.make_trainer(cfg, max_epochs=3, callbacks=[], loggers=[], run_dir=tmp_path)
    assert type(trainer).__name__ == "TaggedTrainer" and trainer.tag == "mine"
    assert trainer.gradient_clip_val == 0.5 and trainer.max_epochs == 3
    assert not set(factory.trainer_options(cfg)) & factory.RECIPE_KEYS and "_target_" not in factory.trainer_options(cfg)
    with pytest.raises(ConfigError, match=r"trainer\.tag is neither a Trainer option nor a recipe key"):
        factory.check_trainer_options(_cfg(tmp_path, "+trainer.tag=mine"))
    with pytest.raises(ConfigError, match=r"trainer\._target_='no_such_module_for_test\.Trainer' is not a class"):
        factory.check_trainer_options(_cfg(tmp_path, "trainer._target_=no_such_module_for_test.Trainer"))
