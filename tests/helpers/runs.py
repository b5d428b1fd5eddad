"""A training run's config in tests: the test's RUN overrides plus its own results and runs folders."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from pyra_bench.paths import CONF_DIR


def run_overrides(run: list[str], tmp_path, *extra: str) -> list[str]:
    return [*run, f"results_dir={tmp_path}/results", f"runs_root={tmp_path}/runs", *extra]


def run_config(run: list[str], tmp_path, *extra: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=run_overrides(run, tmp_path, *extra))
