"""The jobs a command line makes, expanded and checked without Hydra's plugins or Lightning.

``train`` (:func:`pyra_bench.cli.precheck`) and ``sweep dry-run`` expand a sweep exactly as Hydra's basic
sweeper does (:func:`expand_sweep`), compose every job's config and check it (:func:`check_jobs`) before
anything is launched or written. This module must not import Hydra's sweeper classes
(:mod:`pyra_bench.sweep` does): Hydra's plugin scan re-executes ``hydra._internal.core_plugins`` modules, and
a sweeper class imported before that scan is no longer the class its module's ``super()`` calls name.
"""

from __future__ import annotations

import itertools
from typing import Any

from omegaconf import DictConfig

from .errors import ConfigError
from .paths import CONF_DIR


class SweepCheckError(ConfigError):
    """Jobs of a sweep whose configs are not valid, each named by its overrides with its problems."""


def compose(overrides: list[str], hydra_cfg: bool = False) -> DictConfig:
    """``conf/train.yaml`` with ``overrides``; an override Hydra cannot apply (a key the config does not have,
    a malformed value) is a :class:`~pyra_bench.errors.ConfigError` with Hydra's own explanation."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import pyra_bench.factory  # noqa: F401  (registers the config resolvers)

    if GlobalHydra.instance().is_initialized():  # e.g. called from the multirun-end callback
        GlobalHydra.instance().clear()

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=overrides, return_hydra_config=hydra_cfg)
    except (HydraException, OmegaConfBaseException) as e:
        cause = e.__cause__ if isinstance(e.__cause__, (HydraException, OmegaConfBaseException)) else None
        why = " ".join(str(x).strip() for x in (e, cause) if x is not None and str(x).strip())
        raise ConfigError(f"the overrides {' '.join(overrides) or '(none)'} do not make a valid config: {why}"
                          "\n  (python -m pyra_bench.train --help lists the groups and settings)") from None


def check_data(cfg: DictConfig) -> None:
    """The task's data folder exists (:class:`~pyra_bench.data.folder.DataNotFoundError` naming how to make it)."""
    from .data.folder import find_task_dir
    from .data.tasks import task_spec_from_config

    if cfg.task.get("source") == "folder":
        find_task_dir(cfg.data_root, task_spec_from_config(cfg.task))


def check_job(cfg: DictConfig, machine: bool = True) -> None:
    """What ``train`` checks first (:func:`pyra_bench.pipeline.check`), as far as it needs neither Lightning
    nor a model: every config value (:func:`pyra_bench.checks.check_run_config`) and the task's data folder.
    ``machine=False`` (planning a sweep elsewhere): not the data folder, devices and hub of this machine.
    The method's operating point and the split lists are checked by the run itself."""
    from .checks import check_run_config

    check_run_config(cfg, machine)
    if machine:
        check_data(cfg)


#: A sweep with bad jobs names at most this many of them (with their problems) and counts the rest.
SHOW_JOBS = 10


def check_jobs(combos: list[list[str]], machine: bool = True) -> list[DictConfig]:
    """Compose and check (:func:`check_job`) every job of a sweep before anything is launched or written;
    return their configs. One job: its own error. Several: one :class:`SweepCheckError` naming each bad
    job by its overrides."""
    from .checks import remember_hub_checks
    from .errors import InputError

    cfgs, bad = [], []
    with remember_hub_checks():
        for combo in combos:
            try:
                cfg = compose(combo)
                check_job(cfg, machine)
                cfgs.append(cfg)
            except InputError as e:
                if len(combos) == 1:
                    raise
                bad.append((combo, e))
    if bad:
        lines = [f"job {' '.join(c)}:\n    " + str(e).replace("\n", "\n    ") for c, e in bad[:SHOW_JOBS]]
        more = f"\n  ... and {len(bad) - SHOW_JOBS} more" if len(bad) > SHOW_JOBS else ""
        raise SweepCheckError(f"{len(bad)} of the sweep's {len(combos)} jobs have invalid settings (nothing was "
                              f"launched; fix them and run again):\n  " + "\n  ".join(lines) + more)
    return cfgs


def _base(overrides: list[str]) -> DictConfig:
    """The config with Hydra's own part, from the overrides that are not sweeps."""
    return compose([o for o in overrides if "," not in o.split("=", 1)[-1] or o.startswith("experiment=")], True)


def expand_sweep(overrides: list[str], base: DictConfig | None = None) -> list[list[str]]:
    """The override list of every job the basic sweeper would launch."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    base = _base(overrides) if base is None else base
    params = base.hydra.sweeper.get("params") or {}
    parser = OverridesParser.create()
    by_key: dict[str, Any] = {}
    try:
        parsed = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides))
    except HydraException as e:
        raise ConfigError(f"cannot read the overrides {' '.join(overrides)}: {e}") from None
    for o in parsed:
        by_key[o.get_key_element()] = o
    lists = []
    for key, o in by_key.items():
        if o.is_sweep_override():
            lists.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            lists.append([f"{key}={o.get_value_element_as_str()}"])
    return [list(c) for c in itertools.product(*lists)]


#: Sweepers whose jobs :func:`expand_sweep` knows in advance (a search such as Optuna's picks them as it goes).
GRID_SWEEPERS = ("DedupSweeper", "BasicSweeper")


#: Launchers that run the jobs on this machine: only then are its devices, data and network the jobs'.
LOCAL_LAUNCHERS = ("BasicLauncher", "LocalGPULauncher")


def command_jobs(overrides: list[str], multirun: bool) -> tuple[list[list[str]] | None, bool]:
    """The overrides of every run a ``train`` command line makes -- itself for a single run, each job for a
    grid sweep (``-m``, or ``hydra.mode=MULTIRUN`` from a config), None when a search picks them as it goes
    -- and whether they run on this machine (a single run, a local launcher; not SLURM)."""
    base = _base(overrides)
    if not multirun and not str(base.hydra.get("mode") or "").endswith("MULTIRUN"):
        return [list(overrides)], True
    here = str(base.hydra.launcher.get("_target_", "")).endswith(LOCAL_LAUNCHERS)
    if not str(base.hydra.sweeper.get("_target_", "")).endswith(GRID_SWEEPERS):
        return None, here
    return expand_sweep(overrides, base), here
