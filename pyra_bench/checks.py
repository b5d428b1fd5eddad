"""What a config's checks need from this machine and its files, and the entry points' checks.

:func:`check_run_config` (``conf/train.yaml``), :func:`check_bench_config` (``conf/bench.yaml``) and
:func:`check_prepare_config` (``conf/prepare.yaml``) validate a composed config against its
:mod:`pyra_bench.schema` model (every value's type, range and choices) and add what depends on this machine:
the devices it has (:func:`visible_devices`), whether the hub is reachable when ``backbone.weights=hub``
(:func:`check_hub_reachable`, one short TCP connection attempt), the experiment's name. All the problems
are raised as one :class:`~pyra_bench.errors.ConfigCheckError`, one line each; nothing is built, written or
created (output folders are judged by their nearest existing ancestor: :func:`schema.output_dir_problem`).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import platform
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from . import schema
from .errors import HubUnreachableError, InputError
from .schema import PRECISION_ALIASES, PRECISIONS, Problem, output_dir_problem


def resolved(cfg: DictConfig, skip: tuple[str, ...] = ("hydra", "logger", "callbacks")) -> tuple[dict, list[Problem]]:
    """``cfg`` as plain data (not ``skip``: Hydra's part, and what is built once the run has its id), and a
    problem for each value that cannot be resolved (an unset environment
    variable, a missing value); those keys are left out of the data."""
    bad: list[Problem] = []

    def walk(node: Any, prefix: str) -> Any:
        keys = node.keys() if OmegaConf.is_dict(node) else range(len(node))
        out: Any = {} if OmegaConf.is_dict(node) else []
        for k in keys:
            if prefix == "" and k in skip:
                continue
            key = f"{prefix}{k}"
            try:
                v = node[k]
            except Exception as e:  # noqa: BLE001 - an interpolation that does not resolve
                raw = OmegaConf.to_container(node, resolve=False)[k]
                first = str(e).splitlines()[0]
                bad.append(Problem(key, raw, f"cannot be resolved ({first}); set {key}=<value>"))
                continue
            v = walk(v, key + ".") if OmegaConf.is_config(v) else v
            out.update({k: v}) if isinstance(out, dict) else out.append(v)
        return out

    return walk(cfg, ""), bad


# ---------------------------------------------------------------------------------------------------------
# Lightning names and this machine's devices
# ---------------------------------------------------------------------------------------------------------
def visible_devices(accelerator: str) -> int:
    """How many devices of a concrete Lightning accelerator (cpu, cuda, mps, tpu) this process sees: as
    Lightning's accelerator classes count them (cpu: 1, cuda: torch's count, mps: 1 when available), without
    importing Lightning unless it is loaded already or XLA (tpu) is installed."""
    import importlib.util

    if not schema._lightning_loaded() and accelerator in schema.ACCELERATORS and (
            accelerator != "tpu" or importlib.util.find_spec("torch_xla") is None):
        import torch

        if accelerator == "cpu":
            return 1
        if accelerator == "cuda":
            os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # as Lightning: count without a CUDA context
            return int(torch.cuda.device_count())
        if accelerator == "mps":
            return int(os.getenv("DISABLE_MPS", "0") != "1" and torch.backends.mps.is_available()
                       and platform.processor() in ("arm", "arm64"))
        return 0  # tpu without torch_xla
    from lightning.pytorch.accelerators import AcceleratorRegistry

    cls = AcceleratorRegistry[accelerator]["accelerator"]
    return int(cls.auto_device_count()) if cls.is_available() else 0


#: Lightning's choice for ``auto`` (first visible) and for ``gpu`` (``_AcceleratorConnector``'s order).
_AUTO_ORDER, _GPU_ORDER = ("tpu", "mps", "cuda"), ("mps", "cuda")


def _concrete_accelerator(name: str) -> str | None:
    """The accelerator Lightning would use for ``name`` here; None when ``gpu`` finds no GPU."""
    order = {"auto": _AUTO_ORDER, "gpu": _GPU_ORDER}.get(name)
    if order is None:
        return name
    found = next((a for a in order if visible_devices(a) > 0), None)
    return found or ("cpu" if name == "auto" else None)


def _no_device_message(accelerator: str) -> str:
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if accelerator in ("gpu", "cuda"):
        return ("no GPU is visible on this machine (torch.cuda.is_available() is False"
                + (f", CUDA_VISIBLE_DEVICES={cvd!r}" if cvd is not None else "") + ")")
    return f"no {accelerator} device is visible on this machine"


def _hardware_problems(t: dict) -> list[Problem]:
    """What ``trainer``'s accelerator, devices and precision ask of this machine (their names: the schema)."""
    acc, devices, prec, k = t.get("accelerator", "auto"), t.get("devices", 1), t.get("precision"), "trainer."
    if acc not in schema.lightning_accelerators():
        return []
    concrete = _concrete_accelerator(acc)
    visible = visible_devices(concrete) if concrete else 0
    if visible == 0 and concrete != "cpu":
        return [Problem(k + "accelerator", acc, f"{_no_device_message(concrete or acc)}; set {k}accelerator=cpu "
                                               f"(or auto), or run on a machine that has one")]
    out, parsed = [], schema._parse_devices(devices)
    if not isinstance(parsed, str) and parsed != (None, None):
        count, indices = parsed
        if concrete == "cpu" and (indices is not None or count == -1):
            out.append(Problem(k + "devices", devices, f"on the CPU, devices is a number of processes >= 1; set "
                                                       f"{k}devices=1"))
        elif concrete != "cpu" and indices is not None and max(indices) >= visible:
            out.append(Problem(k + "devices", devices, f"this machine shows {visible} {concrete} device(s), indices "
                                                       f"0..{visible - 1}; set {k}devices=<indices below {visible}>"))
        elif concrete != "cpu" and count > visible:
            out.append(Problem(k + "devices", devices, f"this machine shows only {visible} {concrete} device(s); "
                                                       f"set {k}devices={visible} or fewer"))
    if concrete == "cpu" and prec in PRECISIONS and PRECISION_ALIASES.get(str(prec), str(prec)) == "16-mixed":
        out.append(Problem(k + "precision", prec, f"fp16 mixed precision is not supported on the CPU (Lightning would "
                                                  f"silently run bf16-mixed instead); set {k}precision=bf16-mixed or "
                                                  f"32-true"))
    return out


# ---------------------------------------------------------------------------------------------------------
# Timing settings (bench.* and the run's throughput.*)
# ---------------------------------------------------------------------------------------------------------
def _device_problem(name: Any, allow_auto: bool) -> str | None:
    """Why ``name`` is not a device this machine can time on (None: it is)."""
    import torch

    allowed = ("auto, " if allow_auto else "") + "cpu, cuda or cuda:<index>"
    if allow_auto and name == "auto":
        return None
    try:
        dev = torch.device(str(name))
    except (RuntimeError, ValueError):
        return f"not a device name; valid: {allowed}"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"not a device pyra_bench times on; valid: {allowed}"
    n = torch.cuda.device_count()
    if n == 0:
        return f"{_no_device_message('cuda')}; use cpu, or run on a machine with a GPU"
    if dev.index is not None and dev.index >= n:
        return f"this machine shows {n} GPU(s): cuda:0 .. cuda:{n - 1}"
    return None


def _timing_problems(t: dict, prefix: str, allow_auto: bool) -> list[Problem]:
    """The timing device (this machine's) and dtype of ``bench.*`` / the run's ``throughput.*``."""
    from .measure import DTYPES, normalize_dtype

    out, dev, dtype = [], t.get("device"), t.get("dtype")
    if dev is not None and (why := _device_problem(dev, allow_auto)) is not None:
        out.append(Problem(prefix + "device", dev, f"{why} (e.g. {prefix}device=cpu)"))
    if dtype is not None:
        try:
            dtype = normalize_dtype(str(dtype))
        except ValueError:
            return [*out, Problem(prefix + "dtype", dtype, f"unknown dtype; valid choices: {', '.join(DTYPES)} (or "
                                                           f"bf16, fp16, fp32)")]
    if dtype == "float16" and isinstance(dev, str) and dev != "auto" and dev.startswith("cpu"):
        out.append(Problem(prefix + "dtype", "float16", f"float16 autocast is for CUDA; on the CPU set {prefix}dtype="
                                                        f"bfloat16 or float32"))
    return out


# ---------------------------------------------------------------------------------------------------------
# Experiments and hub weights
# ---------------------------------------------------------------------------------------------------------
def experiment_names() -> list[str]:
    """The experiments in ``conf/experiment/`` (file names without ``.yaml``, sub-folders as ``a/b``)."""
    from .paths import CONF_DIR

    folder = Path(CONF_DIR) / "experiment"
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def _experiment_problem(name: Any) -> str | None:
    names = experiment_names()
    if name in (None, "null", "None") or str(name) in names:
        return None
    close = difflib.get_close_matches(str(name), names, n=1)
    return (f"unknown experiment; valid choices: {', '.join(names)}"
            + (f" (did you mean experiment={close[0]}?)" if close else "")
            + "; the experiments are the files of conf/experiment/")


def check_experiment_name(name: str | None) -> None:
    """Refuse an experiment that is not in ``conf/experiment/`` (null / None: no experiment)."""
    from .registry import UnknownChoiceError

    if (why := _experiment_problem(name)) is not None:
        e = UnknownChoiceError("experiment", str(name), experiment_names())
        e.args = (f"experiment={name}: {why}",)  # the registry's message plus the hint and the folder
        raise e


_ABSENT = object()  # a group the config does not have


def _hydra_choice(cfg: DictConfig, group: str) -> Any:
    """What the user chose for a config group (Hydra records it even when an ``optional`` default dropped it)."""
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None, throw_on_resolution_failure=False)
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return _ABSENT
        choices = HydraConfig.get().runtime.choices
    return choices.get(group, _ABSENT)


_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's truthy values for its environment switches


def _hub_address() -> tuple[str, int]:
    """Host and port a hub download connects to first: the HTTPS proxy if one is set, else ``HF_ENDPOINT``."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)),
                 None)
    url = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy
                   else os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _can_connect(host: str, port: int, timeout_s: float) -> bool:
    """One TCP connection attempt, name lookup included, given up after ``timeout_s``."""
    ok: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            ok.append(True)
        except OSError:
            pass

    th = threading.Thread(target=attempt, daemon=True)  # a hanging name lookup ignores socket timeouts
    th.start()
    th.join(timeout_s)
    return bool(ok)


def _hub_files(backbone: str) -> tuple[str, str | None, list[Path | str]]:
    """(timm model name, Hugging Face repo id, files that hold its weights once downloaded) of a backbone."""
    from timm.models import get_pretrained_cfg

    from .models.backbones import get_backbone

    timm_name = get_backbone(backbone).timm_name or backbone
    pc = get_pretrained_cfg(timm_name)
    repo = getattr(pc, "hf_hub_id", None) if pc is not None else None
    if repo:
        repo = repo.split("@", 1)[0]
        names = [pc.hf_hub_filename] if getattr(pc, "hf_hub_filename", None) else ["model.safetensors",
                                                                                   "pytorch_model.bin"]
        return timm_name, repo, names
    if pc is not None and getattr(pc, "url", None):  # a plain URL: torch hub's checkpoint folder
        import torch

        return timm_name, None, [Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(pc.url).path)]
    return timm_name, None, []


def _cached(repo: str | None, files: list) -> bool:
    if repo is None:
        return any(Path(f).is_file() for f in files)
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo, str(f)), str) for f in files)


def check_hub_reachable(backbone: str | None = None, timeout_s: float = 3.0) -> None:
    """Refuse ``backbone.weights=hub`` at once when the hub cannot be reached: offline mode
    (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) or no TCP connection to it (or to the HTTPS proxy)
    within ``timeout_s`` -- unless ``backbone``'s weights are already in the local cache."""
    offline = next((k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(k, "").upper() in _TRUE),
                   None)
    if offline:
        why = f"{offline}={os.environ[offline]} is set (offline mode)"
    else:
        host, port = _hub_address()
        if _can_connect(host, port, timeout_s):
            return
        why = f"{host}:{port} cannot be reached (no connection within {timeout_s:g} s; compute nodes often have no network)"
    timm_name, cache_note = None, ""
    if backbone is not None:
        try:
            timm_name, repo, files = _hub_files(backbone)
        except (InputError, RuntimeError, KeyError):
            repo, files = None, []
        if files and _cached(repo, files):
            return
        cache_note = f", and {repo or timm_name} is not in the local cache" if files else ""
    fetch = (f" (or fetch it once where there is network: python -c \"import timm; timm.create_model('{timm_name}', "
             f"pretrained=True)\", and copy the Hugging Face cache folder, HF_HOME, here)") if timm_name else ""
    raise HubUnreachableError(
        f"backbone.weights=hub needs the Hugging Face hub, but {why}{cache_note}.\n  Use a local file instead: "
        f"backbone.weights=/path/to/<file>.npz (the original ViT release), .pth or .safetensors, or set PYRA_WEIGHTS "
        f"to the folder holding the file the backbone config names{fetch}.")


def _weights_problems(data: dict, machine: bool, needed: bool = True) -> list[Problem]:
    w, name = (data.get("backbone") or {}).get("weights"), (data.get("backbone") or {}).get("name")
    if not needed or w != "hub" or not isinstance(name, str):
        return []
    from .models.backbones import BACKBONES

    if name in BACKBONES and BACKBONES.get(name).timm_name is None:
        return [Problem("backbone.weights", w, f"backbone {name} has no weights on the hub (it is built from "
                                               f"scratch); set backbone.weights=none (random init) or a local file")]
    why = _hub_problem(name if name in BACKBONES else None) if machine else None
    return [] if why is None else [Problem("backbone.weights", w, why)]


_HUB_MEMO: dict[str | None, str | None] | None = None  # set inside remember_hub_checks()


@contextlib.contextmanager
def remember_hub_checks() -> Iterator[None]:
    """Within this block the hub check runs once per backbone: a sweep checks every job, most with the same
    backbone, and an unreachable hub would cost a connection timeout per job."""
    global _HUB_MEMO
    old, _HUB_MEMO = _HUB_MEMO, {} if _HUB_MEMO is None else _HUB_MEMO
    try:
        yield
    finally:
        _HUB_MEMO = old


def _hub_problem(backbone: str | None) -> str | None:
    """:func:`check_hub_reachable`'s refusal as one line (None: the weights can be had)."""
    memo = {} if _HUB_MEMO is None else _HUB_MEMO
    if backbone not in memo:
        try:
            memo[backbone] = check_hub_reachable(backbone)  # (None)
        except HubUnreachableError as e:
            memo[backbone] = str(e).replace("backbone.weights=hub needs", "needs").replace("\n  ", " ")
    return memo[backbone]


# ---------------------------------------------------------------------------------------------------------
# The two configs
# ---------------------------------------------------------------------------------------------------------
def check_run_config(cfg: DictConfig, machine: bool = True) -> None:
    """Check a composed ``conf/train.yaml`` config before anything is built or written; raise one
    :class:`~pyra_bench.errors.ConfigCheckError` listing every problem found. ``machine=False``: not what
    depends on this machine (the devices it has, whether the hub is reachable), e.g. to plan a sweep on
    another one."""
    data, more = resolved(cfg)
    choice = _hydra_choice(cfg, "experiment")
    if choice is not _ABSENT and (why := _experiment_problem(choice)) is not None:
        more.append(Problem("experiment", choice, why))
    t = data.get("trainer") or {}
    if machine and not schema.problems({"trainer": t}, schema.Run):
        more += _hardware_problems(t)
    if data.get("measure_throughput") is True:
        more += _timing_problems(data.get("throughput") or {}, "throughput.", allow_auto=True)
    else:  # not measured: not read
        data.pop("throughput", None)
    more += _weights_problems(data, machine)
    if data.get("compression") == data.get("budget") is not None:  # ${method.default_compression}: budget's line
        data.pop("compression")
    schema.check(data, schema.Run, "run config", more)


def check_bench_config(cfg: DictConfig) -> None:
    """Check a composed ``conf/bench.yaml`` config before any model is built; raise one
    :class:`~pyra_bench.errors.ConfigCheckError` listing every problem found."""
    data, more = resolved(cfg)
    b, bench = "bench.", data.get("bench") or {}
    more += _timing_problems(bench, b, allow_auto=False)
    out, run = bench.get("output"), bench.get("run")
    if out is None or run:  # bench.run writes into output_dir whatever bench.output says
        d = bench.get("output_dir")
        why = "must be a folder path" if not d else output_dir_problem(d)
        if why:
            more.append(Problem(b + "output_dir", d, f"{why}; set {b}output_dir=<a folder you can write to>"))
    if out is not None:
        p = Path(str(out)).expanduser()
        if p.is_dir():
            more.append(Problem(b + "output", out, f"is a folder; give a file name, e.g. {b}output={p / 'bench.json'}, "
                                                   f"or set {b}output=null to write into {b}output_dir"))
        elif (why := output_dir_problem(p.parent)) is not None:
            more.append(Problem(b + "output", out, f"its folder {why}; set {b}output=<a file in a folder you can "
                                                   f"write to>"))
    records = bench.get("records_dir")
    if records is not None and run and bench.get("update_record") is True:
        p = Path(str(records)).expanduser()
        if not p.is_dir():
            more.append(Problem(b + "records_dir", records, f"is not a folder (it should hold the runs' records); set "
                                f"{b}records_dir=<the runs' results_dir> or null (each run's own results_dir)"))
        elif not os.access(p, os.W_OK | os.X_OK):
            more.append(Problem(b + "records_dir", records, f"is not writable by this user; set {b}update_record=false "
                                                            f"or another {b}records_dir"))
    more += _weights_problems(data, True, needed=bench.get("load_weights") is True)
    schema.check(data, schema.BenchFile, "bench config", more)


def check_prepare_config(cfg: DictConfig) -> None:
    """Check a composed ``conf/prepare.yaml`` config before any task folder is made; raise one
    :class:`~pyra_bench.errors.ConfigCheckError` listing every problem found (the task names and the reader
    are checked by :func:`pyra_bench.data.prepare.run`)."""
    data, more = resolved(cfg)
    for key in ("data_dir", "manual_dir"):
        v = data.get(key)
        if v is not None and Path(str(v)).expanduser().exists() and not Path(str(v)).expanduser().is_dir():
            more.append(Problem(key, v, f"exists and is not a folder; set {key}=<a folder> or null (TFDS's default)"))
    schema.check(data, schema.Prepare, "prepare config", more)
