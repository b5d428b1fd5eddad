"""pyra_bench.checks: every bad setting of a run or bench config is named (key, value, what is allowed) in one
error, before anything is built or written; nothing is created; hub weights without network fail at once."""

import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pyra_bench.train  # noqa: F401  (registers the config resolvers run_id / first)
from pyra_bench import checks, schema
from pyra_bench.checks import check_bench_config, check_experiment_name, check_hub_reachable, check_run_config
from pyra_bench.errors import (
    ConfigCheckError,
    ConfigError,
    HubUnreachableError,
    InputError,
    exit_on_input_error,
)
from pyra_bench.paths import CONF_DIR

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a visible GPU")


def _compose(name, *overrides, hydra_cfg=False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra_cfg)


class _Conn:
    def close(self):
        pass


@pytest.fixture
def reachable_hub(monkeypatch):
    """A hub that answers (some shipped configs use backbone.weights=hub): no real connection is made."""
    calls = []
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
              "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: calls.append(address) or _Conn())
    return calls


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def base_run(out_root):
    return _compose("train", "task=digits", "backbone=vit_tiny_test", "trainer=smoke", "trainer.accelerator=cpu",
                    f"results_dir={out_root}/results", f"run_dir={out_root}/runs/x")


@pytest.fixture(scope="module")
def base_bench(out_root):
    return _compose("bench", "backbone=vit_tiny_test", f"bench.output_dir={out_root}/bench")


def _with(cfg, **updates):
    """A copy of ``cfg`` with ``a__b=value`` set as ``a.b`` (new keys allowed)."""
    c = cfg.copy()
    for k, v in updates.items():
        OmegaConf.update(c, k.replace("__", "."), v, merge=False, force_add=True)
    return c


def _problems(check, cfg):
    with pytest.raises(ConfigCheckError) as ei:
        check(cfg)
    e = ei.value
    assert isinstance(e, ConfigError) and isinstance(e, InputError) and isinstance(e, ValueError)
    lines = str(e).splitlines()
    assert len(lines) == 1 + len(e.problems), "a header and one line per problem"
    return {p.key: p for p in e.problems}, str(e)


def _only(check, cfg, key, shown):
    """``cfg`` has exactly one problem, at ``key``, and its line shows ``key=<shown>``."""
    found, msg = _problems(check, cfg)
    assert set(found) == {key}, msg
    assert f"  - {key}={shown}: " in msg, msg
    return found[key].message


# ---------------------------------------------------------------------------------------------------------
# shipped configs pass
# ---------------------------------------------------------------------------------------------------------
def test_shipped_configs_pass(base_run, base_bench, out_root):
    """The first test to check a run config: it pays for importing Lightning once (its names are read there)."""
    check_run_config(base_run)
    check_bench_config(base_bench)
    for trainer in ("paper", "demo", "smoke"):  # the default (demo) composition with each trainer recipe
        check_run_config(_compose("train", f"trainer={trainer}", f"results_dir={out_root}/r", f"run_dir={out_root}/rr"))


def test_every_experiment_passes(out_root, reachable_hub):
    """Each conf/experiment/*.yaml composes to a valid run (the experiment choice itself is checked too)."""
    experiments = sorted(p[:-5] for p in os.listdir(Path(CONF_DIR) / "experiment") if p.endswith(".yaml"))
    assert checks.experiment_names() == experiments
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for exp in experiments:
            check_run_config(compose("train", overrides=[f"experiment={exp}", f"results_dir={out_root}/r",
                                                         f"run_dir={out_root}/rr"], return_hydra_config=True))
    assert reachable_hub, "some experiments use hub weights: the hub was asked (a stand-in that answers)"


def test_protocols_match_train():
    try:  # the protocols' home: pyra_bench.identity (issue 11), pyra_bench.train before it
        from pyra_bench.identity import PROTOCOLS
    except ImportError:
        from pyra_bench.train import PROTOCOLS
    assert schema.PROTOCOLS == tuple(PROTOCOLS)


def test_evaluations_match_the_pipeline():
    pipeline = pytest.importorskip("pyra_bench.pipeline", reason="the run pipeline (issue 11) has not landed here",
                                   exc_type=ImportError)
    assert schema.EVALUATIONS == tuple(pipeline.EVALUATIONS)


# ---------------------------------------------------------------------------------------------------------
# numbers and names, one at a time
# ---------------------------------------------------------------------------------------------------------
BAD_RUN = [  # (key, value, how the line shows it)
    ("trainer.epochs", 0, "0"), ("trainer.epochs", -1, "-1"), ("trainer.epochs", 2.5, "2.5"),
    ("trainer.epochs", "ten", "'ten'"), ("trainer.epochs", True, "true"),
    ("trainer.warmup_epochs", -1, "-1"), ("trainer.warmup_epochs", 2, "2"),  # smoke: epochs=2
    ("trainer.eval_every", 0, "0"), ("trainer.eval_every", -1, "-1"), ("trainer.eval_every", None, "null"),
    ("trainer.max_steps_per_epoch", 0, "0"), ("trainer.max_steps_per_epoch", 0.5, "0.5"),
    ("trainer.num_workers", -1, "-1"), ("trainer.cpu_threads", 0, "0"),
    ("trainer.batch_size", 0, "0"), ("trainer.eval_batch_size", 0, "0"), ("trainer.num_nodes", 0, "0"),
    ("trainer.lr", 0.0, "0.0"), ("trainer.lr", -1e-3, "-0.001"), ("trainer.lr", math.nan, "nan"),
    ("trainer.lr", math.inf, "inf"), ("trainer.lr", "1e-3x", "'1e-3x'"),
    ("trainer.min_lr", -1e-5, "-1e-05"), ("trainer.warmup_lr", math.nan, "nan"),
    ("trainer.weight_decay", -1e-4, "-0.0001"),
    ("trainer.drop_path", 1.0, "1.0"), ("trainer.drop_path", -0.1, "-0.1"), ("peft.dropout", 1.5, "1.5"),
    ("trainer.precision", "fp33", "'fp33'"), ("trainer.precision", 32.0, "32.0"),
    ("trainer.accelerator", "gpux", "'gpux'"), ("trainer.strategy", "dp", "'dp'"),
    ("trainer.devices", 0, "0"), ("trainer.devices", -2, "-2"), ("trainer.devices", "abc", "'abc'"),
    ("trainer.devices", [0, 0], "[0, 0]"), ("peft.init", "xavier", "'xavier'"),
    ("trainer.deterministic", "yes", "'yes'"),
    ("seed", -1, "-1"), ("seed", 2**32, "4294967296"), ("seed", 1.5, "1.5"), ("seed", "abc", "'abc'"),
    ("protocol", "tune", "'tune'"), ("retries", -1, "-1"), ("retries", 0.5, "0.5"),
    ("budget", 2.0, "2.0"), ("budget", "flops:1.5", "'flops:1.5'"), ("compression", "speedup:0.5", "'speedup:0.5'"),
    ("force", 1, "1"), ("verify_images", "no", "'no'"), ("export_inference_model", None, "null"),
]


@pytest.mark.parametrize("key,value,shown", BAD_RUN, ids=[f"{k}={s}" for k, _, s in BAD_RUN])
def test_bad_run_value_is_named(base_run, key, value, shown):
    message = _only(check_run_config, _with(base_run, **{key.replace(".", "__"): value}), key, shown)
    assert any(w in message for w in ("must be", "valid", "unknown", "set ")), message


GOOD_RUN = [  # settings at the edge of what is allowed (smoke: 2 epochs, 1 warm-up epoch)
    {"trainer.epochs": 1, "trainer.warmup_epochs": 0}, {"trainer.warmup_epochs": 0}, {"trainer.lr": 1e-12},
    {"trainer.drop_path": 0.0}, {"peft.dropout": 0.999}, {"trainer.weight_decay": 0},
    {"trainer.cpu_threads": None}, {"trainer.max_steps_per_epoch": None}, {"trainer.max_steps_per_epoch": 1},
    {"trainer.num_workers": 0}, {"trainer.precision": "bf16-mixed"}, {"trainer.precision": 32},
    {"trainer.precision": "64-true"}, {"trainer.precision": "bf16"}, {"trainer.devices": "auto"},
    {"trainer.devices": "2"}, {"trainer.devices": 4}, {"trainer.strategy": "ddp"}, {"trainer.strategy": "DDP"},
    {"trainer.deterministic": "warn"}, {"seed": 0}, {"seed": 2**32 - 1}, {"protocol": "tuning"}, {"retries": 0},
]


@pytest.mark.parametrize("updates", GOOD_RUN, ids=[",".join(f"{k}={v}" for k, v in u.items()) for u in GOOD_RUN])
def test_boundary_values_pass(base_run, updates):
    check_run_config(_with(base_run, **{k.replace(".", "__"): v for k, v in updates.items()}))


def test_hydra_overrides_from_the_command_line(out_root):
    """The values as Hydra parses them from the command line (-1, nan, a float epoch count)."""
    cfg = _compose("train", "trainer=smoke", "trainer.epochs=-1", "trainer.lr=nan", "trainer.eval_every=0",
                   "seed=3.0", f"results_dir={out_root}/r", f"run_dir={out_root}/rr")
    found, msg = _problems(check_run_config, cfg)
    assert set(found) == {"trainer.epochs", "trainer.lr", "trainer.eval_every", "seed"}, msg
    assert "trainer.epochs=-1" in msg and "trainer.lr=nan" in msg and "seed=3.0" in msg


def test_all_problems_in_one_message(base_run):
    cfg = _with(base_run, trainer__epochs=0, seed=-5, trainer__precision="fp33", results_dir="")
    found, msg = _problems(check_run_config, cfg)
    assert set(found) == {"trainer.epochs", "seed", "trainer.precision", "results_dir"}
    assert msg.startswith("run config: 4 invalid settings")
    for line in ("trainer.epochs=0:", "seed=-5:", "trainer.precision='fp33':", "results_dir='':"):
        assert f"\n  - {line}" in msg


def test_exit_status_2_and_every_line(base_run, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(ConfigCheckError) as ei:
        check_run_config(_with(base_run, trainer__epochs=0, retries=-1))
    with pytest.raises(SystemExit) as ex:
        exit_on_input_error(ei.value, "pyra_bench.train")
    assert ex.value.code == 2
    err = capsys.readouterr().err
    assert "trainer.epochs=0" in err and "retries=-1" in err and "Traceback" not in err


def test_unresolvable_value_is_named(base_run, base_bench, monkeypatch):
    monkeypatch.delenv("PYRA_NOPE_XYZ", raising=False)
    msg = _only(check_run_config, _with(base_run, results_dir="${oc.env:PYRA_NOPE_XYZ}"), "results_dir",
                "'${oc.env:PYRA_NOPE_XYZ}'")
    assert "PYRA_NOPE_XYZ" in msg and "cannot be resolved" in msg
    # a switch read twice (its own check, then to decide what else to check) is still one line
    _only(check_run_config, _with(base_run, measure_throughput="${oc.env:PYRA_NOPE_XYZ}"), "measure_throughput",
          "'${oc.env:PYRA_NOPE_XYZ}'")
    _only(check_bench_config, _with(base_bench, bench__load_weights="${oc.env:PYRA_NOPE_XYZ}"), "bench.load_weights",
          "'${oc.env:PYRA_NOPE_XYZ}'")


def lightning_precisions() -> tuple:
    """Every ``precision`` value Lightning's Trainer accepts, from Lightning itself (names, ints, aliases)."""
    from typing import get_args

    from lightning.fabric.plugins.precision import precision as p

    return (get_args(p._PRECISION_INPUT_STR) + get_args(p._PRECISION_INPUT_INT)
            + get_args(p._PRECISION_INPUT_STR_ALIAS))


def test_precision_names_are_lightnings():
    """Lightning itself accepts every precision the check accepts, and refuses what it refuses."""
    from lightning.fabric.connector import _convert_precision_to_unified_args

    accepted = lightning_precisions()
    assert {"32-true", "16-mixed", "bf16-mixed", "64-true", 32, "bf16"} <= set(accepted)
    for p in accepted:
        _convert_precision_to_unified_args(p)
    for p in ("fp33", "fp32", 8):
        assert p not in accepted
        with pytest.raises(ValueError):
            _convert_precision_to_unified_args(p)


def test_lightning_name_copies_are_lightnings(monkeypatch):
    """The checks read copies of Lightning's names (no Lightning import before a run or a sweep starts);
    each copy equals what the installed Lightning has, and the device counts agree with its accelerators'."""
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR_ALIAS_CONVERSION
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    assert schema.PRECISIONS == lightning_precisions()
    assert schema.PRECISION_ALIASES == _PRECISION_INPUT_STR_ALIAS_CONVERSION
    assert sorted(schema.ACCELERATORS) == sorted(AcceleratorRegistry.available_accelerators())
    assert list(schema.STRATEGIES) == list(StrategyRegistry.available_strategies())
    lightnings = {acc: checks.visible_devices(acc) for acc in ("cpu", "cuda", "mps", "tpu")}  # its classes
    monkeypatch.setattr(schema, "_lightning_loaded", lambda: False)  # as before Lightning's import
    assert {acc: checks.visible_devices(acc) for acc in lightnings} == lightnings
    assert schema.lightning_accelerators() == ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators()))


# ---------------------------------------------------------------------------------------------------------
# evaluation schedule (trainer.evaluation / eval_epochs / eval_precision / checkpoint_every, when present)
# ---------------------------------------------------------------------------------------------------------
def test_evaluation_schedule(base_run):
    run = base_run
    check_run_config(_with(run, trainer__evaluation="final", trainer__eval_every=None))
    check_run_config(_with(run, trainer__evaluation="final", trainer__eval_every=0))
    check_run_config(_with(run, trainer__evaluation="every_n", trainer__eval_every=1, trainer__eval_epochs=None))
    check_run_config(_with(run, trainer__evaluation="epochs", trainer__eval_epochs=[1, 11, 21, 100]))
    for ok in ("auto", 32, "bf16", "32-true"):
        check_run_config(_with(run, trainer__eval_precision=ok))
    check_run_config(_with(run, trainer__checkpoint_every=None))
    _only(check_run_config, _with(run, trainer__evaluation="every_n", trainer__eval_every=None), "trainer.eval_every",
          "null")
    assert "every_n, final, epochs" in _only(check_run_config, _with(run, trainer__evaluation="last"),
                                             "trainer.evaluation", "'last'")
    assert "needs the list" in _only(check_run_config, _with(run, trainer__evaluation="epochs", trainer__eval_epochs=None),
                                     "trainer.eval_epochs", "null")
    for bad, shown in (([0], "[0]"), ("5", "'5'"), ([1.5], "[1.5]"), ([], "[]"), ([-1, 2], "[-1, 2]")):
        _only(check_run_config, _with(run, trainer__eval_epochs=bad), "trainer.eval_epochs", shown)
    assert "twice" in _only(check_run_config, _with(run, trainer__eval_epochs=[1, 1]), "trainer.eval_epochs", "[1, 1]")
    _only(check_run_config, _with(run, trainer__eval_precision="fp16"), "trainer.eval_precision", "'fp16'")
    _only(check_run_config, _with(run, trainer__checkpoint_every=0), "trainer.checkpoint_every", "0")


def test_run_dir_null_checks_runs_root(base_run, tmp_path):
    (tmp_path / "f").write_text("x")
    check_run_config(_with(base_run, run_dir=None, runs_root=str(tmp_path / "runs")))
    _only(check_run_config, _with(base_run, run_dir=None, runs_root=str(tmp_path / "f")), "runs_root",
          repr(str(tmp_path / "f")))
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------
# accelerators and devices this machine has
# ---------------------------------------------------------------------------------------------------------
@NO_GPU
@pytest.mark.parametrize("acc", ["cuda", "gpu"])
def test_gpu_accelerator_without_gpu(base_run, acc):
    msg = _only(check_run_config, _with(base_run, trainer__accelerator=acc), "trainer.accelerator", f"'{acc}'")
    assert "no GPU is visible" in msg and "trainer.accelerator=cpu" in msg


@pytest.fixture
def two_gpus(monkeypatch):
    real = checks.visible_devices
    monkeypatch.setattr(checks, "visible_devices", lambda a: 2 if a == "cuda" else 0 if a != "cpu" else real(a))


@pytest.mark.parametrize("acc", ["cuda", "gpu", "auto"])
def test_more_devices_than_visible(base_run, two_gpus, acc):
    run = _with(base_run, trainer__accelerator=acc)
    for ok in (1, 2, -1, [0, 1], "0,1", "auto"):
        check_run_config(_with(run, trainer__devices=ok))
    assert "only 2 cuda" in _only(check_run_config, _with(run, trainer__devices=4), "trainer.devices", "4")
    assert "indices 0..1" in _only(check_run_config, _with(run, trainer__devices=[0, 3]), "trainer.devices", "[0, 3]")
    assert "only 2 cuda" in _only(check_run_config, _with(run, trainer__devices="3"), "trainer.devices", "'3'")


def test_cpu_devices_are_processes(base_run):
    run = base_run
    check_run_config(_with(run, trainer__devices=4))
    _only(check_run_config, _with(run, trainer__devices=[0]), "trainer.devices", "[0]")
    _only(check_run_config, _with(run, trainer__devices=-1), "trainer.devices", "-1")


def test_fp16_mixed_on_cpu_is_refused(base_run, two_gpus):
    msg = _only(check_run_config, _with(base_run, trainer__accelerator="cpu", trainer__precision="16-mixed"),
                "trainer.precision", "'16-mixed'")
    assert "bf16-mixed" in msg
    _only(check_run_config, _with(base_run, trainer__accelerator="cpu", trainer__precision=16), "trainer.precision", "16")
    check_run_config(_with(base_run, trainer__accelerator="cuda", trainer__precision="16-mixed"))


# ---------------------------------------------------------------------------------------------------------
# output folders: refused when unusable, never created
# ---------------------------------------------------------------------------------------------------------
def _tree(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def test_output_folders_checked_without_creating(base_run, tmp_path):
    (tmp_path / "a_file").write_text("x")
    before = _tree(tmp_path)
    check_run_config(_with(base_run, results_dir=str(tmp_path / "new" / "deep" / "results"),
                           run_dir=str(tmp_path / "new2" / "run")))
    msg = _only(check_run_config, _with(base_run, results_dir=str(tmp_path / "a_file")), "results_dir",
                repr(str(tmp_path / "a_file")))
    assert "not a folder" in msg
    msg = _only(check_run_config, _with(base_run, run_dir=str(tmp_path / "a_file" / "sub" / "run")), "run_dir",
                repr(str(tmp_path / "a_file" / "sub" / "run")))
    assert f"{tmp_path / 'a_file'} is a file" in msg
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    before.append("dangling")
    msg = _only(check_run_config, _with(base_run, results_dir=str(tmp_path / "dangling" / "r")), "results_dir",
                repr(str(tmp_path / "dangling" / "r")))
    assert "broken symbolic link" in msg
    assert _tree(tmp_path) == sorted(before), "the checks created something"
    assert (tmp_path / "a_file").read_text() == "x"


def test_unwritable_ancestor_is_named(base_run, tmp_path, monkeypatch):
    """The nearest existing folder decides (simulated: the tests may run as root, whom chmod does not stop)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    msg = _only(check_run_config, _with(base_run, results_dir=str(locked / "x" / "y")), "results_dir",
                repr(str(locked / "x" / "y")))
    assert f"{locked} (its nearest existing folder) is not writable" in msg
    assert "cannot write" in _only(check_run_config, _with(base_run, run_dir=str(locked)), "run_dir", repr(str(locked)))
    assert not (locked / "x").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_unwritable_folder_for_real(base_run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        _only(check_run_config, _with(base_run, results_dir=str(locked / "r")), "results_dir", repr(str(locked / "r")))
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------------------------------------------------
# experiments
# ---------------------------------------------------------------------------------------------------------
def test_misspelt_experiment(out_root):
    from pyra_bench.registry import UnknownChoiceError

    check_experiment_name(None)
    check_experiment_name("table2_vit_b")
    with pytest.raises(UnknownChoiceError) as ei:
        check_experiment_name("tabel2_vit_b")
    msg = str(ei.value)
    assert isinstance(ei.value, InputError)
    assert msg.startswith("experiment=tabel2_vit_b: unknown experiment") and "did you mean experiment=table2_vit_b" in msg
    assert "table8_gated" in msg  # lists the choices
    # With `optional experiment: null` in train.yaml, a misspelt experiment composes to the demo's config and
    # only Hydra's record of the choice tells: check_run_config reads it. With a plain `experiment: none`
    # default, Hydra itself refuses it at composition, listing the choices.
    from hydra.errors import MissingConfigException

    try:
        cfg = _compose("train", "experiment=tabel2_vit_b", f"results_dir={out_root}/r", f"run_dir={out_root}/rr",
                       hydra_cfg=True)
    except MissingConfigException as e:
        assert "table2_vit_b" in str(e)
        return
    assert cfg.task.name == "digits"
    assert "table2_vit_b" in _only(check_run_config, cfg, "experiment", "'tabel2_vit_b'")


# ---------------------------------------------------------------------------------------------------------
# hub weights
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_env_offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
              "all_proxy"):
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def no_socket(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("no connection may be attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def empty_hf_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _hub_message_names_alternative(msg):
    assert "backbone.weights=" in msg and ".npz" in msg and ".safetensors" in msg and "PYRA_WEIGHTS" in msg, msg


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_mode_fails_at_once(no_env_offline, no_socket, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    with pytest.raises(HubUnreachableError) as ei:
        check_hub_reachable()
    assert isinstance(ei.value, InputError) and isinstance(ei.value, ConnectionError)
    assert f"{var}=1" in str(ei.value)
    _hub_message_names_alternative(str(ei.value))


def test_no_connection_fails_at_once(no_env_offline, monkeypatch):
    calls = []

    def refuse(address, timeout=None, **k):
        calls.append((address, timeout))
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(HubUnreachableError) as ei:
        check_hub_reachable(timeout_s=2)
    assert calls == [(("huggingface.co", 443), 2)]
    assert "huggingface.co:443 cannot be reached" in str(ei.value)
    _hub_message_names_alternative(str(ei.value))
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.example.org:8443")
    with pytest.raises(HubUnreachableError, match="hf-mirror.example.org:8443"):
        check_hub_reachable()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.org:3128")
    with pytest.raises(HubUnreachableError, match="proxy.example.org:3128"):
        check_hub_reachable()
    assert [a for a, _ in calls[1:]] == [("hf-mirror.example.org", 8443), ("proxy.example.org", 3128)]


def test_reachable_hub_passes(reachable_hub):
    check_hub_reachable()
    assert reachable_hub == [("huggingface.co", 443)]


def test_hanging_lookup_gives_up_after_the_timeout(no_env_offline, monkeypatch):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: time.sleep(30) or _Conn())
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachableError):
        check_hub_reachable(timeout_s=0.3)
    assert time.perf_counter() - t0 < 2.0


def test_cached_weights_need_no_network(no_env_offline, no_socket, monkeypatch, empty_hf_cache):
    """Offline, but the weights are in the Hugging Face cache (its layout written out by hand): allowed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = empty_hf_cache / "models--timm--vit_base_patch16_224.orig_in21k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "model.safetensors").write_bytes(b"")
    check_hub_reachable("vit_b16_in21k")
    with pytest.raises(HubUnreachableError) as ei:
        check_hub_reachable("vit_l16_in21k")
    assert "timm/vit_large_patch16_224.orig_in21k is not in the local cache" in str(ei.value)
    assert "timm.create_model('vit_large_patch16_224.orig_in21k', pretrained=True)" in str(ei.value)


def test_run_config_with_hub_weights(base_run, no_env_offline, no_socket, monkeypatch, empty_hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = base_run
    msg = _only(check_run_config, _with(run, backbone__name="vit_b16_in21k", backbone__weights="hub"),
                "backbone.weights", "'hub'")
    assert "HF_HUB_OFFLINE=1" in msg and "PYRA_WEIGHTS" in msg
    msg = _only(check_run_config, _with(run, backbone__weights="hub"), "backbone.weights", "'hub'")
    assert "vit_tiny_test has no weights on the hub" in msg


# ---------------------------------------------------------------------------------------------------------
# bench config (and the run's throughput block)
# ---------------------------------------------------------------------------------------------------------
BAD_BENCH = [
    ("bench.batch_size", 0, "0"), ("bench.batch_size", -8, "-8"), ("bench.batch_size", 2.5, "2.5"),
    ("bench.threads", 0, "0"), ("bench.warmup_s", -1.0, "-1.0"), ("bench.warmup_s", math.nan, "nan"),
    ("bench.duration_s", 0.0, "0.0"), ("bench.duration_s", math.inf, "inf"),
    ("bench.device", "gpu", "'gpu'"), ("bench.device", "cuda:abc", "'cuda:abc'"), ("bench.device", "meta", "'meta'"),
    ("bench.device", "auto", "'auto'"), ("bench.dtype", "fp64", "'fp64'"), ("bench.dtype", "float16", "'float16'"),
    ("num_classes", 0, "0"), ("bench.flops", "yes", "'yes'"),
]


@pytest.mark.parametrize("key,value,shown", BAD_BENCH, ids=[f"{k}={s}" for k, _, s in BAD_BENCH])
def test_bad_bench_value_is_named(base_bench, key, value, shown):
    _only(check_bench_config, _with(base_bench, **{key.replace(".", "__"): value}), key, shown)


def test_bench_good_values(base_bench):
    for k, v in (("bench__batch_size", None), ("bench__batch_size", 1), ("bench__warmup_s", 0.0),
                 ("bench__dtype", "bf16"), ("bench__threads", 1), ("bench__device", "cpu")):
        check_bench_config(_with(base_bench, **{k: v}))


@NO_GPU
def test_bench_cuda_without_gpu(base_bench):
    assert "no GPU is visible" in _only(check_bench_config, _with(base_bench, bench__device="cuda"), "bench.device",
                                        "'cuda'")


def test_bench_gpu_index(base_bench, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_bench_config(_with(base_bench, bench__device="cuda:0", bench__dtype="float16"))
    assert "cuda:0 .. cuda:0" in _only(check_bench_config, _with(base_bench, bench__device="cuda:1"), "bench.device",
                                       "'cuda:1'")


def test_bench_outputs(base_bench, tmp_path):
    (tmp_path / "f").write_text("x")
    before = _tree(tmp_path)
    _only(check_bench_config, _with(base_bench, bench__output_dir=str(tmp_path / "f")), "bench.output_dir",
          repr(str(tmp_path / "f")))
    check_bench_config(_with(base_bench, bench__output=str(tmp_path / "new" / "b.json")))
    assert "is a folder" in _only(check_bench_config, _with(base_bench, bench__output=str(tmp_path)), "bench.output",
                                  repr(str(tmp_path)))
    _only(check_bench_config, _with(base_bench, bench__output=str(tmp_path / "f" / "b.json")), "bench.output",
          repr(str(tmp_path / "f" / "b.json")))
    _only(check_bench_config, _with(base_bench, bench__run=str(tmp_path), bench__records_dir=str(tmp_path / "nope")),
          "bench.records_dir", repr(str(tmp_path / "nope")))
    check_bench_config(_with(base_bench, bench__run=str(tmp_path), bench__records_dir=str(tmp_path)))
    assert _tree(tmp_path) == before


def test_bench_hub_weights_only_when_loaded(base_bench, no_env_offline, no_socket, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bench = _with(base_bench, backbone__name="vit_b16_in21k", backbone__weights="hub")
    check_bench_config(bench)  # random init: the weights are not read
    assert "HF_HUB_OFFLINE=1" in _only(check_bench_config, _with(bench, bench__load_weights=True), "backbone.weights",
                                       "'hub'")


def test_run_throughput_block_checked_when_measured(base_run):
    run = _with(base_run, throughput__batch_size=0, throughput__duration_s=0)
    check_run_config(run)  # not measured: not read
    found, _ = _problems(check_run_config, _with(run, measure_throughput=True))
    assert set(found) == {"throughput.batch_size", "throughput.duration_s"}
    check_run_config(_with(base_run, measure_throughput=True, throughput__device="auto"))
