"""conf/local/: one's own cluster settings, git-ignored (conf/local/default.yaml) beside a committed example."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from pyra_bench.paths import CONF_DIR

ROOT = Path(__file__).resolve().parent.parent


def _compose(overrides, conf_dir: Path = CONF_DIR):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_local_settings_are_git_ignored_but_the_example_is_not():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("conf/local/default.yaml") and ignored("conf/local/mine.yaml")
    assert not ignored("conf/local/example.yaml")


WIRED = re.search(r"^\s*-\s*optional local:\s*default", (CONF_DIR / "train.yaml").read_text(), re.M) is not None


def test_the_example_sets_the_slurm_launcher():
    cfg = _compose(["local=example" if WIRED else "+local=example"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.account) == ("gpu", "my_account")
    assert launcher.setup[0] == "module load cuda/12.4"
    assert cfg.data_root == _compose([]).data_root  # the commented-out paths change nothing


@pytest.mark.skipif(not WIRED,
                    reason="needs lead wiring: `- optional local: default` as the last entry of conf/train.yaml's defaults")
def test_local_default_is_loaded_last_and_the_command_line_wins(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf, ignore=shutil.ignore_patterns("local"))
    assert _compose([], conf).data_root != "/scratch/vtab"  # optional: no local/default.yaml is fine
    (conf / "local").mkdir()
    (conf / "local" / "default.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/launcher: slurm\ndata_root: /scratch/vtab\n"
        "hydra:\n  launcher:\n    array_parallelism: 7\n")
    cfg = _compose([], conf)
    assert cfg.data_root == "/scratch/vtab"  # wins over train.yaml's default
    assert cfg.hydra.launcher.array_parallelism == 7 and cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert _compose(["experiment=table2_vit_b"], conf).data_root == "/scratch/vtab"
    assert _compose(["data_root=/elsewhere"], conf).data_root == "/elsewhere"
    assert _compose(["~local"], conf).data_root != "/scratch/vtab"
