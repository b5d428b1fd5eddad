"""``hydra/launcher=local``: a sweep's jobs on this machine, one job per GPU at a time.

Each job is ``python -m <app> <where the configs come from> <hydra overrides> <its overrides>`` in a
subprocess that sees one GPU (``CUDA_VISIBLE_DEVICES``): it composes the job's config exactly as the sweep
did (:func:`job_command`: the sweep's ``--config-dir``, a ``--config-path`` / ``--config-name`` other than
the app's own, and its Hydra overrides such as ``hydra.searchpath``), so local settings
(``<dir>/local/default.yaml``) and plug-in methods work as under ``basic`` and ``submitit``. As many jobs run
at once as there are GPU slots (``gpus``: ``auto`` = every visible GPU, or a list of ids; ``jobs_per_gpu``),
one at a time without a GPU. A job's output goes to ``<sweep dir>/<job>/job.log`` and its outcome to
``<sweep dir>/<job>/outcome.json``, which the end-of-sweep summary reads (a job that exits before it writes
one -- refused for bad input before the run starts -- is recorded as failed with the last lines of its
log); a failing job never stops the others. (submitit's local executor, by contrast, starts
every job at once and hides the GPUs unless told their number.)
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher

log = logging.getLogger("pyra_bench")

JOB_DIR_ENV = "PYRA_SWEEP_JOB_DIR"  # tells the job it is one of a sweep (write outcome.json there)


def gpu_slots(gpus: Any = "auto", jobs_per_gpu: int = 1) -> list[str | None]:
    """One entry per concurrent job: the GPU id it sees, or None (no GPU: one job at a time)."""
    if gpus in (None, "auto"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            ids = [g for g in visible.split(",") if g.strip()]
        else:
            try:
                import torch

                ids = [str(i) for i in range(torch.cuda.device_count())]
            except Exception:  # noqa: BLE001
                ids = []
    else:
        ids = [str(g) for g in (gpus if isinstance(gpus, (list, tuple)) or hasattr(gpus, "__iter__") and
                                not isinstance(gpus, str) else str(gpus).split(","))]
    return [g for g in ids for _ in range(max(1, int(jobs_per_gpu)))] or [None]


#: Hydra overrides of the sweep that only a multirun reads: not passed to the jobs (each job is a single run).
_SWEEP_ONLY = ("hydra/launcher", "hydra/sweeper", "hydra.launcher.", "hydra.sweeper.", "hydra.sweep.", "hydra.mode")


def job_command(hydra_cfg: Mapping[str, Any], app: str, overrides: Sequence[str]) -> list[str]:
    """The arguments after ``python -m <app>`` that compose one job of a sweep as the sweep composed it:
    ``--config-dir`` (a config source given on the sweep's command line), ``--config-path`` and
    ``--config-name`` when they are not the app's own (:data:`pyra_bench.paths.CONF_DIR`, ``app``'s last
    name), the sweep's Hydra overrides (``hydra.searchpath=...``, ``hydra/job_logging=...``; not the
    launcher's and sweeper's own), then the job's overrides. ``hydra_cfg``: the sweep's ``hydra`` node."""
    from .paths import CONF_DIR

    args: list[str] = []
    for source in hydra_cfg["runtime"]["config_sources"]:
        if source["schema"] not in ("file", "pkg"):
            continue
        path = source["path"] if source["schema"] == "file" else f"pkg://{source['path']}"
        if source["provider"] == "command-line":
            args += ["--config-dir", path]
        elif source["provider"] == "main" and (source["schema"] != "file" or
                                              Path(path).resolve() != Path(CONF_DIR).resolve()):
            args += ["--config-path", path]
    name = hydra_cfg["job"]["config_name"]
    if name and name != app.rpartition(".")[2]:
        args += ["--config-name", str(name)]
    args += [o for o in hydra_cfg["overrides"]["hydra"] if not str(o).lstrip("+~").startswith(_SWEEP_ONLY)]
    return args + list(overrides)


def record_refusal(job_dir: Path, returncode: int) -> None:
    """``outcome.json`` of a job that exited without writing one (refused before its run started: bad input
    at the command line): failed, with the log's last lines as the message."""
    outcome = job_dir / "outcome.json"
    if returncode == 0 or outcome.exists():
        return
    try:
        lines = [ln.strip() for ln in (job_dir / "job.log").read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errors = [i for i, ln in enumerate(lines) if ": error: " in ln]  # an entry point's one message
    why = " ".join(lines[errors[-1]:] if errors else lines[-5:])[-2000:] or "no output"
    from .records import atomic_write_json

    atomic_write_json(outcome, {"run_id": None, "status": "failed", "record": None,
                                "error": f"exit status {returncode}: {why}"})


class LocalGPULauncher(Launcher):
    def __init__(self, gpus: Any = "auto", jobs_per_gpu: int = 1, app: str = "pyra_bench.train",
                 python: str | None = None) -> None:
        self.gpus, self.jobs_per_gpu, self.app = gpus, jobs_per_gpu, app
        self.python = python or sys.executable
        self.config = self.hydra_context = self.task_function = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _run_one(self, idx: int, overrides: Sequence[str], gpu: str | None) -> JobReturn:
        job_dir = Path(str(self.config.hydra.sweep.dir)) / str(idx)
        job_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, JOB_DIR_ENV: str(job_dir)}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        else:
            env.setdefault("CUDA_VISIBLE_DEVICES", "")
        with open(job_dir / "job.log", "w") as out:
            p = subprocess.run([self.python, "-m", self.app, *job_command(self.config.hydra, self.app, overrides)],
                               stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
        record_refusal(job_dir, p.returncode)
        log.info("job %d (%s) exited with status %d%s", idx, " ".join(overrides), p.returncode,
                 "" if gpu is None else f" on GPU {gpu}")
        ret = JobReturn(overrides=list(overrides), working_dir=str(job_dir), task_name=self.app)
        ret.status, ret.return_value = JobStatus.COMPLETED, p.returncode
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        slots = gpu_slots(self.gpus, self.jobs_per_gpu)
        log.info("launching %d jobs locally, %d at a time%s", len(job_overrides), len(slots),
                 "" if slots == [None] else f" on GPUs {','.join(dict.fromkeys(s for s in slots if s))}")
        results: list[JobReturn | None] = [None] * len(job_overrides)
        free = list(slots)
        cond = threading.Condition()
        threads = []

        def work(i: int, overrides: Sequence[str], slot: str | None) -> None:
            try:
                results[i] = self._run_one(initial_job_idx + i, overrides, slot)
            finally:
                with cond:
                    free.append(slot)
                    cond.notify()

        for i, overrides in enumerate(job_overrides):
            with cond:
                while not free:
                    cond.wait()
                slot = free.pop(0)
            t = threading.Thread(target=work, args=(i, list(overrides), slot), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        return [r for r in results if r is not None]
