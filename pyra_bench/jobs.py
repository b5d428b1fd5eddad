"""A sweep's jobs, composed and checked once, before the first starts.

:func:`check_jobs` is what the sweeper (:class:`pyra_bench.sweep.DedupSweeperMixin`, which already holds
every job's overrides) and ``sweep dry-run`` call: each job is composed -- once per distinct set of group
choices; jobs that differ only in values share that composition and get their values as Hydra applies a
command line's (:func:`compose_jobs`) -- and checked (:func:`check_job`); every bad job is named with its
problems in one :class:`SweepCheckError`. This module must not import Hydra's sweeper classes at module
level (:mod:`pyra_bench.sweep` does): Hydra's plugin scan re-executes ``hydra._internal.core_plugins``
modules, and a sweeper class imported before that scan is no longer the class its module's ``super()`` calls
name. (:func:`expand_sweep`, called only by ``sweep dry-run`` / ``summary``, which start no Hydra sweep,
borrows the basic sweeper's static splitter.)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, InputError
from .paths import CONF_DIR


class SweepCheckError(ConfigError):
    """Jobs of a sweep whose configs are not valid, each named by its overrides with its problems."""


def as_config_error(e: Exception, overrides: list[str]) -> ConfigError:
    """Hydra's refusal of ``overrides`` (a key the config does not have, a malformed value) as one message."""
    cause = e.__cause__ if e.__cause__ is not None and type(e.__cause__).__module__.startswith(("hydra", "omegaconf")) \
        else None
    why = " ".join(str(x).strip() for x in (e, cause) if x is not None and str(x).strip())
    return ConfigError(f"the overrides {' '.join(overrides) or '(none)'} do not make a valid config: {why}"
                       "\n  (python -m pyra_bench.train --help lists the groups and settings)")


def compose(overrides: list[str], hydra_cfg: bool = False) -> DictConfig:
    """``conf/train.yaml`` with ``overrides`` (Hydra's compose API); an override Hydra cannot apply is a
    :class:`~pyra_bench.errors.ConfigError` with Hydra's own explanation."""
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
        raise as_config_error(e, overrides) from None


def _is_group(key: str) -> bool:
    key = key.lstrip("+~")
    return "/" in key or key.startswith("hydra") or (CONF_DIR / key).is_dir()


def compose_jobs(combos: list[list[str]], compose_fn: Callable[[list[str]], DictConfig]) -> list[Any]:
    """Each job's config (or the :class:`InputError` composing it raised). Hydra composes the defaults list
    and then applies the command line's values (``OmegaConf.update(cfg, key, value, merge=True)``); so jobs
    with the same group choices share one composition and get their plain ``key=value`` overrides applied to
    a copy. Anything else (``+key``, ``~key``, a key the config lacks) is composed by Hydra itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    parser, base, out = OverridesParser.create(), {}, []
    for combo in combos:
        groups = tuple(o for o in combo if _is_group(o.split("=", 1)[0]))
        try:
            values = parser.parse_overrides([o for o in combo if o not in groups])
            if any(v.type != OverrideType.CHANGE or v.package is not None for v in values):
                raise LookupError
            if groups not in base:
                base[groups] = compose_fn(list(groups))
            cfg = copy.deepcopy(base[groups])
            for v in values:
                if OmegaConf.select(cfg, v.key_or_group, default=KeyError) is KeyError:
                    raise LookupError
                OmegaConf.update(cfg, v.key_or_group, v.value(), merge=True)
        except (LookupError, InputError, HydraException, OmegaConfBaseException):  # Hydra composes it below
            cfg = None
        try:
            out.append(cfg if cfg is not None else compose_fn(list(combo)))
        except InputError as e:
            out.append(e)
    return out


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


def check_jobs(combos: list[list[str]], machine: bool = True,
               compose_fn: Callable[[list[str]], DictConfig] | None = None) -> list[DictConfig]:
    """Compose (:func:`compose_jobs`) and check (:func:`check_job`) every job of a sweep before anything is
    launched or written; return their configs. One job: its own error. Several: one :class:`SweepCheckError`
    naming each bad job by its overrides."""
    from .checks import remember_hub_checks

    cfgs, bad = [], []
    with remember_hub_checks():
        for combo, cfg in zip(combos, compose_jobs(combos, compose_fn or compose)):
            try:
                if isinstance(cfg, InputError):
                    raise cfg
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
    """The override list of every job the basic sweeper would launch (its own splitter, over the config's
    ``hydra.sweeper.params`` and then ``overrides``)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    base = _base(overrides) if base is None else base
    params = base.hydra.sweeper.get("params") or {}
    try:
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides))
        return BasicSweeper.split_arguments(parsed, None)[0]
    except HydraException as e:
        raise ConfigError(f"cannot read the overrides {' '.join(overrides)}: {e}") from None


#: Launchers that run the jobs on this machine: only then are its devices, data and network the jobs'.
LOCAL_LAUNCHERS = ("BasicLauncher", "LocalGPULauncher")
