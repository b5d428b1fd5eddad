"""Speed targets: the least merging that makes a model ``x`` times faster *on the device it runs on*.

``compression=speedup:<x>`` (ToMe, PYRA) asks for the merging schedule with the least merging whose measured
inference throughput is at least ``x`` times the unmerged model's, at the benchmark batch size and dtype.

* **Candidates** are the schedules of FLOPs targets (:func:`~pyra_bench.models.schedules.schedule_for_macs`,
  ToMe's constant-r / (r, inflection) forms), ordered by their MACs fraction ``f``: less merging = larger
  ``f``. The search assumes that throughput falls as ``f`` grows (true up to timing noise).
* **Timing** is the project's protocol (:func:`pyra_bench.measure.measure_throughput`: eval mode,
  inference mode, random input, warm-up, synchronised whole forwards) on the method's own inference
  structure (e.g. PYRA's modulators included), with shorter windows than a benchmark (``warmup_s`` /
  ``duration_s``); a candidate's speed is its fastest timed forward (``batch / min iteration time``, as
  ``timeit`` advises: what other work on a shared machine can only slow down; on a dedicated GPU it is
  within a few percent of the protocol's mean).
* **Search**: the unmerged model first, then ``f = 1/x`` (MACs-proportional speed), then the floor (most
  merging) if needed, then bisection on ``f`` between the largest fraction known to reach the target and
  the smallest known to miss it, until no distinct schedule lies between them or they are ``resolution``
  apart. The choice is then **verified**: the unmerged model and the choice are timed once more (each
  schedule's speed is the best seen: other work on the machine can only slow a forward down); if the
  target is missed now, the search goes on below it. A target that even the floor misses is refused,
  naming the speedup measured.
* **Cache**: measurements and choices are kept per (device, backbone and its geometry, method, batch,
  dtype, torch version) in ``<user cache>/speedup/<device>.json`` (``$PYRA_BENCH_CACHE`` or
  ``~/.cache/pyra_bench``), so a second run on the same machine times nothing. The result (choice, all
  candidates' timings, whether it came from the cache) goes into the method state and so the run record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .macs import BudgetError, ViTGeometry
from .schedules import clamp_schedule, schedule_for_macs

#: Bisection stops when the fractions reaching and missing the target are this close.
RESOLUTION = 0.01


def cache_file(device: str) -> Path:
    """The speed-target cache of one device (a JSON file in the user cache)."""
    from ..measure import device_slug
    from ..paths import user_cache_dir

    return user_cache_dir() / "speedup" / f"{device_slug(device)}.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict[str, Any]) -> None:
    from ..records import atomic_write_json

    try:
        atomic_write_json(path, data)
    except OSError:  # a read-only cache only costs the timing next time
        pass


def find_speedup_schedule(
    target: float,
    make_model: Callable[[], nn.Module],
    install: Callable[[nn.Module, list[int]], None],
    geometry: ViTGeometry,
    num_protected: int = 1,
    *,
    key: dict[str, Any],
    device: str = "cpu",
    batch_size: int | None = None,
    dtype: str = "float32",
    warmup_s: float = 2.0,
    duration_s: float = 3.0,
    use_cache: bool = True,
    resolution: float = RESOLUTION,
    max_timings: int = 12,
    backbone: str = "?",
) -> tuple[list[int], dict[str, Any]]:
    """The schedule with the least merging whose measured throughput is ``>= target`` x the unmerged one's.

    ``make_model()`` returns a fresh inference model without reducers (called once, only if something must
    be timed); ``install(m, schedule)`` puts the method's reducers for ``schedule`` into it. ``key`` identifies the backbone and
    method in the cache (device, batch, dtype and the torch version are added). Returns ``(schedule,
    info)``; ``info`` is JSON-able: target, reached speedup, throughputs, every candidate timed, cache use.
    """
    from ..measure import default_batch_size, device_name, measure_throughput, normalize_dtype

    L, N, P = geometry.depth, geometry.num_tokens, num_protected
    batch = int(batch_size or default_batch_size(device))
    dtype = normalize_dtype(dtype)
    entry_key = json.dumps({**key, "device": device_name(device), "batch_size": batch, "dtype": dtype,
                            "torch": torch.__version__, "tokens": N, "depth": L}, sort_keys=True)
    path = cache_file(device)
    cache = _read(path) if use_cache else {}
    entry = cache.get(entry_key, {"timings": {}, "choices": {}})
    timings: dict[str, float] = entry["timings"]
    info_common = {"target": target, "device": device_name(device), "batch_size": batch, "dtype": dtype,
                   "cache_file": str(path) if use_cache else None}
    choice = entry["choices"].get(repr(float(target)))
    if choice is not None:
        return list(choice["schedule"]), {**info_common, **choice, "from_cache": True}

    work: nn.Module | None = None  # the timed copy, made on first use
    timed = 0

    def speed(schedule: Sequence[int], fresh: bool = False) -> float:
        """Best img/s seen for ``schedule`` (timed now if never timed, or ``fresh``)."""
        nonlocal work, timed
        k = json.dumps(list(schedule))
        if fresh or k not in timings:
            if timed >= max_timings:
                raise _OutOfTimings
            if work is None:
                work = make_model().eval()
            install(work, list(schedule))
            r = measure_throughput(work, batch_size=batch, image_size=None, device=device, dtype=dtype,
                                   warmup_s=warmup_s, duration_s=duration_s)
            timings[k] = max(timings.get(k, 0.0), batch / r["iter_time_s"]["min"])
            timed += 1
        return timings[k]

    def at(f: float) -> list[int]:
        return schedule_for_macs(f, geometry, P, tolerance=1.0, backbone=backbone)[0]

    base_sched = [0] * L
    floor_sched = clamp_schedule([N] * L, N, P)
    floor = geometry.fraction(floor_sched)

    def reaches(schedule: Sequence[int]) -> bool:
        return speed(schedule) / speed(base_sched) >= target

    ok_f: float | None = 1.0 if target <= 1 else None  # largest MACs fraction known to reach the target
    bad_f = 1.0  # smallest known to miss it
    verified = target <= 1
    try:
        speed(base_sched)
        while not verified:
            if ok_f is None:  # bracket: MACs-proportional guess, else the floor
                guess = 1.0 / target
                if floor < guess < bad_f - resolution and reaches(at(guess)):
                    ok_f = guess
                else:
                    bad_f = min(bad_f, guess) if floor < guess < bad_f else bad_f
                    if not reaches(floor_sched):
                        raise BudgetError(
                            f"speedup:{target:g} is out of reach on {device_name(device)} for backbone {backbone!r} "
                            f"(batch {batch}, {dtype}): the most merging (every block merging as much as its "
                            f"bipartite split allows, {floor:.3f} of the MACs) measured "
                            f"{speed(floor_sched) / speed(base_sched):.2f}x the unmerged model's "
                            f"{speed(base_sched):.1f} img/s.")
                    ok_f = floor
            while bad_f - ok_f > resolution:  # bisection on the MACs fraction
                mid = (ok_f + bad_f) / 2
                s = at(mid)
                if s in (at(ok_f), at(bad_f)):
                    break
                if reaches(s):
                    ok_f = mid
                else:
                    bad_f = mid
            # verify: time the unmerged model and the choice again; a miss sends the search to more merging
            speed(base_sched, fresh=True)
            speed(at(ok_f), fresh=True)
            verified = reaches(at(ok_f))
            if not verified:
                ok_f, bad_f = None, ok_f
    except _OutOfTimings:
        if ok_f is None:
            raise BudgetError(f"speedup:{target:g}: no schedule reaching the target was found within {max_timings} "
                              f"timings on {device_name(device)} (timing too noisy? raise the timing windows)") from None
    finally:
        work = None
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    chosen = base_sched if ok_f >= 1.0 else at(ok_f)
    base = speed(base_sched)
    candidates = sorted(
        ({"schedule": json.loads(k), "macs_fraction": geometry.fraction(json.loads(k)), "img_per_s": v,
          "speedup": v / base} for k, v in timings.items()), key=lambda c: -c["macs_fraction"])
    choice = {"schedule": chosen, "macs_fraction": geometry.fraction(chosen), "speedup": speed(chosen) / base,
              "img_per_s": speed(chosen), "baseline_img_per_s": base, "verified": verified,
              "candidates": candidates, "timing_window_s": [warmup_s, duration_s]}
    if use_cache:
        cache = _read(path)  # another run may have written meanwhile
        entry = cache.setdefault(entry_key, {"timings": {}, "choices": {}})
        for k, v in timings.items():
            entry["timings"][k] = max(entry["timings"].get(k, 0.0), v)
        if verified:
            entry["choices"][repr(float(target))] = choice
        _write(path, cache)
    return chosen, {**info_common, **choice, "from_cache": False}


class _OutOfTimings(Exception):
    """The search used up its timings."""
