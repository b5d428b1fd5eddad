"""Entry points refuse bad input before any work (exit 2, one message, nothing written), and nothing the
framework loads runs code: a crafted pickle placed where init_from, a checkpoint, a stage file or bench.run
read is refused (or set aside) without executing."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pyra_bench.cli import unknown_choices
from pyra_bench.errors import InputError
from pyra_bench.paths import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent
RUN = ["task=digits", "backbone=vit_tiny_test", "trainer=smoke", "method=tome", "compression=low",
       "export_inference_model=false", "logger=none", "callbacks=none"]


class _Exploit:
    """Unpickling this writes a marker file: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted(path: Path, marker: Path) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": _Exploit(marker), "pyra_bench": {}}, path)
    with open(path.with_suffix(".pkl"), "wb") as f:
        pickle.dump(_Exploit(marker), f)
    return path


def _cfg(tmp_path, *extra):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*RUN, f"results_dir={tmp_path}/results", f"runs_root={tmp_path}/runs",
                                           *extra])


def test_a_misspelt_group_choice_is_one_message_with_exit_status_2(tmp_path):
    (msg,) = unknown_choices(["experiment=table2_vitb", "method=tome,pyra"], ("experiment", "method"))
    assert msg.startswith("unknown experiment 'table2_vitb' (did you mean table2_vit_b,")
    assert msg.endswith("valid choices: " + ", ".join(sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))))
    assert unknown_choices(["method=tome,pyyra"], ("method",))[0].startswith("unknown method 'pyyra' (did you mean pyra")
    p = subprocess.run([sys.executable, "-c", "from pyra_bench.train import cli; cli()", "experiment=table2_vitb",
                        f"runs_root={tmp_path}/runs"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "unknown experiment 'table2_vitb'" in p.stderr and "Traceback" not in p.stderr
    assert not list(tmp_path.iterdir()), "nothing is written"


def test_init_from_a_crafted_pickle_runs_nothing(tmp_path):
    from pyra_bench.train import train

    marker = tmp_path / "pwned"
    bad = _crafted(tmp_path / "other" / "train.pt", marker)
    for path in (bad, bad.with_suffix(".pkl")):
        with pytest.raises(InputError):
            train(_cfg(tmp_path, f"init_from={path}"))
    assert not marker.exists()


def test_a_crafted_checkpoint_in_the_run_folder_is_set_aside_not_executed(tmp_path):
    from pyra_bench.identity import run_id
    from pyra_bench.train import train

    marker = tmp_path / "pwned"
    cfg = _cfg(tmp_path)
    _crafted(tmp_path / "runs" / run_id(cfg) / "ckpt" / "train" / "last.ckpt", marker)
    rec = train(cfg)
    assert rec["status"] == "completed" and not marker.exists()
    assert (Path(cfg.run_dir) / "ckpt" / "train" / "last.ckpt.corrupt").exists()


def test_a_crafted_stage_file_or_exported_model_runs_nothing(tmp_path):
    from pyra_bench.export import load_inference_model
    from pyra_bench.lifecycle import load_stage

    marker = tmp_path / "pwned"
    bad = _crafted(tmp_path / "run" / "inference_model.pt", marker)
    with pytest.raises(InputError, match="not loaded, since unpickling can run code"):
        load_inference_model(bad)
    (tmp_path / "run" / "inference_model.json").write_text('{"format": 2, "method_state": {}, "config": {}}')
    os.replace(bad, tmp_path / "run" / "inference_model.safetensors")  # a pickle under the safetensors name
    with pytest.raises(InputError):
        load_inference_model(tmp_path / "run")
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "train.json").write_text('{"format": 2, "tensors": "train.safetensors", "tensors_bytes": 0}')
    _crafted(tmp_path / "stages" / "train.safetensors", marker)
    with pytest.raises(InputError):
        load_stage(tmp_path / "stages" / "train.json")
    assert not marker.exists()


def test_bench_run_on_a_crafted_file_runs_nothing(tmp_path, monkeypatch, capsys):
    from helpers.cli import run_entry_point

    from pyra_bench.bench import cli

    marker = tmp_path / "pwned"
    bad = _crafted(tmp_path / "run" / "inference_model.pt", marker)
    code, _, err = run_entry_point(cli, "pyra_bench/bench.py", [f"bench.run={bad}", f"bench.output_dir={tmp_path}/bench"],
                                   tmp_path, monkeypatch, capsys, env={"HYDRA_FULL_ERROR": "0"})
    assert code == 2 and "unpickling can run code" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "bench").exists()
