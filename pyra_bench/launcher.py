"""``hydra/launcher=local``: a sweep's jobs on this machine, one job per GPU at a time.

Each job is ``python -m <app> <its overrides>`` in a subprocess that sees one GPU
(``CUDA_VISIBLE_DEVICES``); as many jobs run at once as there are GPU slots (``gpus``: ``auto`` = every
visible GPU, or a list of ids; ``jobs_per_gpu``), one at a time without a GPU. A job's output goes to
``<sweep dir>/<job>/job.log`` and its outcome to ``<sweep dir>/<job>/outcome.json``, which the end-of-sweep
summary reads; a failing job never stops the others. (submitit's local executor, by contrast, starts
every job at once and hides the GPUs unless told their number.)
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
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
            p = subprocess.run([self.python, "-m", self.app, *overrides], stdout=out, stderr=subprocess.STDOUT,
                               env=env, check=False)
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
