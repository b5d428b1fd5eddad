"""Merging schedules: how many tokens each block merges (``r`` per layer, spec section 2).

Accepted forms (:func:`resolve_schedule`):

* ``"none"`` / ``None`` / ``0``      -> no merging
* a preset name, e.g. ``"low"`` / ``"high"`` -> the paper's schedule for the backbone's family
* an int ``r`` or ``"r16"``          -> constant r in every block (ToMe)
* ``[r_0, ..., r_{L-1}]``            -> per-layer list of whole numbers, one per block (ToMe pads a shorter
  list with zeros; here a list of another length is an error naming the depth, so a schedule written for
  another backbone is never silently cut or padded)
* ``{"r": 16, "inflection": -0.5}`` or ``"tome:16,-0.5"`` -> ToMe's linear schedule with an inflection in
  ``[-1, 1]`` (:data:`INFLECTION_RANGE`: -1 = 2r in the first block, 0 in the last; 1 = the reverse)

A schedule asking a layer for more merges than it has mergeable tokens is an error at build time
(:func:`check_schedule`), naming the layer and its token count.

Targets instead of schedules (resolved by the merging methods against the backbone, see
:mod:`pyra_bench.methods.tome`): ``"flops:<f>"`` -> :func:`schedule_for_macs`, the schedule whose analytic
MACs are closest to ``f`` of the unmerged backbone's; ``"speedup:<x>"`` -> :mod:`pyra_bench.models.speedup`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from ..registry import UnknownChoiceError
from .macs import BudgetError, ViTGeometry
from .merging import max_merge

# The paper's schedules (the authors' model/tome.py get_merging_schedule), keyed by backbone family.
PRESETS: dict[str, dict[str, list[int]]] = {
    "vit_b": {
        "low": [16] * 11 + [10],
        "high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
    },
    "vit_l": {
        "low": [8] * 23 + [6],
        "high": [20, 19, 18, 17, 15, 13, 13, 12, 10, 9, 8, 6, 6, 4, 4, 4, 3, 3, 2, 2, 1, 1, 1, 1],
    },
    "deit_b": {
        "low": [16] * 6 + [10] * 6,
        "high": [40, 34, 30, 24, 18, 14, 10, 8, 4, 4, 3, 3],
    },
    # Our own tiny backbones (tests and the offline demo), feasible low/high settings.
    "demo": {  # 4 blocks, 65 tokens (64 patches + class token)
        "low": [20, 12, 8, 4],
        "high": [32, 16, 8, 4],
    },
    "tiny": {  # 3 blocks, 17 tokens (16 patches + class token)
        "low": [4, 3, 2],
        "high": [8, 4, 2],
    },
}


class ScheduleError(ConfigError):
    """A merging schedule that is malformed or that the backbone cannot run."""


#: ToMe's inflections: -1 (merge 2r first, 0 last) .. 0 (constant r) .. 1 (0 first, 2r last); outside this
#: range a block's r would be negative.
INFLECTION_RANGE = (-1.0, 1.0)
#: ToMe inflections searched for FLOPs targets: constant r (0) down to "2r in block 0, 0 in the last" (-1).
#: Only non-increasing schedules (merge early, like the paper's "high" preset).
INFLECTIONS: tuple[float, ...] = tuple(round(-0.1 * i, 1) for i in range(11))
#: A FLOPs target prefers the most constant schedule among those this close to it.
PREFER_WITHIN = 0.005


def tome_linear_schedule(num_layers: int, r: int, inflection: float = 0.0) -> list[int]:
    """ToMe's ``parse_r`` for ``(r, inflection)``: linear from r(1-inflect) to r(1+inflect)."""
    min_val = int(r * (1.0 - inflection))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / max(num_layers - 1, 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def _whole(v: Any, what: str) -> int:
    """``v`` as an int when it is a whole number (``2``, ``2.0``, ``"2"``); a fraction, a bool or a word is a
    :class:`ScheduleError` naming ``what`` (never truncated: 1.7 is not 1)."""
    if isinstance(v, bool):
        raise ScheduleError(f"{what}={v!r} is not a number of tokens; give a whole number >= 0")
    if isinstance(v, int):
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ScheduleError(f"{what}={v!r} is not a number of tokens; give a whole number >= 0") from None
    if not f.is_integer():
        raise ScheduleError(f"{what}={v!r} is not a whole number of tokens (it would be cut to {int(f)}); give a "
                            f"whole number >= 0, e.g. {round(f)}")
    return int(f)


def _tome_form(num_layers: int, r: Any, inflection: Any, form: str) -> list[int]:
    """ToMe's ``(r, inflection)`` after checking both (``form``: how the user wrote it, for the message)."""
    r = _whole(r, f"r of {form}")
    if r < 0:
        raise ScheduleError(f"r of {form} is {r}: the tokens merged per block must be >= 0, e.g. tome:16,-0.5")
    try:
        inf = float(inflection)
    except (TypeError, ValueError):
        inf = float("nan")
    lo, hi = INFLECTION_RANGE
    if not lo <= inf <= hi:  # NaN too
        raise ScheduleError(f"inflection {inflection!r} of {form} is outside [{lo:g}, {hi:g}] (ToMe's range: -1 merges "
                            f"2r in the first block and 0 in the last, 0 is constant r, 1 the reverse); e.g. "
                            f"tome:{r},-0.5")
    return tome_linear_schedule(num_layers, r, inf)


def resolve_schedule(spec: Any, num_layers: int, family: str | None = None) -> list[int]:
    """Turn any accepted schedule form into a list of ``num_layers`` ints (negative ones are left to
    :func:`check_schedule`, which names the block)."""
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "", "0")):
        return [0] * num_layers
    if hasattr(spec, "items") and not isinstance(spec, str):  # dict / DictConfig
        spec = dict(spec)
        if "r" not in spec:
            raise ScheduleError(f"a schedule mapping needs key 'r' (and optionally 'inflection'), got {spec}")
        return _tome_form(num_layers, spec["r"], spec.get("inflection", 0.0), f"schedule {spec}")
    if isinstance(spec, bool):
        raise ScheduleError(f"invalid schedule {spec!r}")
    if isinstance(spec, (int, float)):
        return [_whole(spec, "schedule")] * num_layers
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith(("flops:", "speedup:")):
            raise ScheduleError(f"{s!r} is a target, not a schedule: it is resolved against the backbone by the "
                                "merging methods (tome, pyra); give a schedule form here")
        if s.startswith("tome:"):
            r, _, inf = s[5:].partition(",")
            try:
                r, inf = int(r), float(inf or 0.0)
            except ValueError:
                raise ScheduleError(f"cannot read schedule {s!r}: expected 'tome:<int r>,<inflection>', "
                                    "e.g. tome:16,-0.5") from None
            return _tome_form(num_layers, r, inf, s)
        if s.startswith("r") and s[1:].isdigit():
            return [int(s[1:])] * num_layers
        if s.isdigit():
            return [int(s)] * num_layers
        presets = PRESETS.get(family or "", {})
        if s not in presets:
            valid = sorted(presets) + ["none", "r<N>", "tome:<r>,<inflection>", "[r_0, ..., r_L-1]",
                                       "flops:<fraction>", "speedup:<x>"]
            raise UnknownChoiceError(f"schedule for backbone family {family!r}", s, valid)
        spec = presets[s]
    if isinstance(spec, Sequence):
        spec = list(spec)
        r = [_whole(v, f"block {i} of schedule {spec}") for i, v in enumerate(spec)]
        if len(r) != num_layers:
            raise ScheduleError(
                f"schedule {spec} has {len(r)} entries but the backbone has {num_layers} blocks (depth "
                f"{num_layers}): give one number per block, e.g. {(r + [0] * num_layers)[:num_layers]} (0 = no "
                f"merging in that block), or a form that fits any depth (r<N>, tome:<r>,<inflection>)")
        return r
    raise ScheduleError(f"cannot interpret schedule {spec!r}")


def token_counts(schedule: Sequence[int], num_tokens: int) -> list[int]:
    """Tokens *entering* each block, plus the final count (length L + 1). Assumes a feasible schedule."""
    counts = [num_tokens]
    for r in schedule:
        counts.append(counts[-1] - r)
    return counts


def check_schedule(schedule: Sequence[int], num_tokens: int, num_protected: int = 1) -> list[int]:
    """Raise :class:`ScheduleError` if a block is asked to merge more tokens than it can; return counts."""
    n = num_tokens
    for i, r in enumerate(schedule):
        if r < 0:
            raise ScheduleError(f"block {i}: negative r={r}")
        cap = max_merge(n, num_protected)
        if r > cap:
            raise ScheduleError(
                f"infeasible merging schedule: block {i} has {n} tokens ({num_protected} protected), so at most "
                f"{cap} can be merged (bipartite split), but the schedule asks for r={r}. Schedule: {list(schedule)}"
            )
        n -= r
    return token_counts(schedule, num_tokens)


def clamp_schedule(schedule: Sequence[int], num_tokens: int, num_protected: int = 1) -> list[int]:
    """ToMe's own rule for a too large ``r``: a block merges at most what its bipartite split allows
    (``min(r, (n - protected) // 2)``), so any ``r`` becomes a feasible schedule."""
    out, n = [], num_tokens
    for r in schedule:
        r = max(0, min(int(r), max_merge(n, num_protected)))
        out.append(r)
        n -= r
    return out


def schedule_for_macs(target: float, geometry: ViTGeometry, num_protected: int = 1, tolerance: float = 0.01,
                      backbone: str = "?") -> tuple[list[int], dict[str, Any]]:
    """The merging schedule whose analytic MACs are closest to ``target`` (a fraction of the unmerged
    backbone's MACs), searched over ToMe's forms, each clamped as ToMe does (:func:`clamp_schedule`):

    * constant ``r`` (``r<N>``);
    * fractional constant ``r + k/L``: ``r + 1`` in the first ``k`` blocks, ``r`` in the others (form
      ``r<N>+<k>``), which fills the MAC steps between ``r`` and ``r + 1`` (fine steps on small backbones);
    * ToMe's ``(r, inflection)`` for the inflections :data:`INFLECTIONS` (form ``tome:<r>,<inflection>``);
    * if none of these is within :data:`PREFER_WITHIN` (backbones with few tokens): the closest one, refined
      one token at a time (one more or fewer in a block, or merged in another block) while that brings the
      MACs closer (form ``per-layer``).

    Among the schedules within :data:`PREFER_WITHIN` of the target (or, if none is, the closest ones) the
    simplest is taken: constant, then fractional constant, then the smallest ``|inflection|``, then
    per-layer; then the closest. At 0.5 on ViT-B/16 this is the paper's "low" schedule (r16, clamped in the last block).
    Returns ``(schedule, info)``; ``info`` holds the target, the fraction reached and the form. A target
    below the reachable floor (every block merging as much as its bipartite split allows) or further than
    ``tolerance`` from every reachable fraction raises :class:`~pyra_bench.models.macs.BudgetError`.
    """
    L, N, P = geometry.depth, geometry.num_tokens, num_protected
    floor = geometry.fraction(clamp_schedule([N] * L, N, P))
    if target < floor - tolerance:
        raise BudgetError(
            f"flops:{target:g} is below what merging can reach on backbone {backbone!r}: at most every block "
            f"merges as many tokens as its bipartite split allows, which leaves {floor:.3f} of the MACs "
            f"({N} tokens, {L} blocks). Ask for flops:{floor:.2f} or more.")
    found: dict[tuple[int, ...], tuple[float, float, str]] = {}  # schedule -> (error, simplicity, form)

    def add(raw: list[int], simplicity: float, form: str) -> None:
        sched = tuple(clamp_schedule(raw, N, P))
        if sched not in found:
            found[sched] = (abs(geometry.fraction(sched) - target), simplicity, form)

    r_max = max_merge(N, P)
    for r in range(r_max + 1):
        add([r] * L, 0.0, f"r{r}")
    for r in range(r_max):
        for k in range(1, L):
            add([r + 1] * k + [r] * (L - k), 0.5, f"r{r}+{k}")
    for inflection in INFLECTIONS[1:]:
        for r in range(1, r_max + 1):
            add(tome_linear_schedule(L, r, inflection), 1.0 + abs(inflection), f"tome:{r},{inflection:g}")
    best = min(err for err, _, _ in found.values())
    if best > PREFER_WITHIN:  # small backbones: refine the closest schedule one block at a time
        refined = _refine(min(found, key=lambda sc: found[sc][0]), target, geometry, P)
        add(refined, 2.0, "per-layer")
        best = min(best, found[tuple(refined)][0])
    if best > tolerance:
        fracs = sorted({round(geometry.fraction(s), 3) for s in found})
        below = max((f for f in fracs if f <= target), default=None)
        above = min((f for f in fracs if f >= target), default=None)
        raise BudgetError(
            f"flops:{target:g} cannot be met within {tolerance:g} on backbone {backbone!r} ({N} tokens, {L} "
            f"blocks: merging one token more or less moves the MACs in coarse steps); the nearest reachable "
            f"fractions are {below} and {above}. Ask for one of those, or raise the tolerance "
            "(method.kwargs.flops_tolerance).")
    pool = [(simplicity, err, form, s) for s, (err, simplicity, form) in found.items()
            if err <= max(best, PREFER_WITHIN)]
    _, _, form, sched = min(pool)
    return list(sched), {"target": target, "macs_fraction": geometry.fraction(sched), "form": form,
                         "tolerance": tolerance}


def _refine(schedule: Sequence[int], target: float, geometry: ViTGeometry, num_protected: int) -> list[int]:
    """Local descent on ``|fraction - target|``: each step takes the best feasible change of one block by one
    token (merge one more or one fewer) or of two blocks (one token merged in another block instead: a finer
    step), until none helps."""
    cur = list(schedule)
    err = abs(geometry.fraction(cur) - target)
    L = len(cur)
    moves = [((i, d),) for i in range(L) for d in (-1, 1)] + [((i, -1), (j, 1)) for i in range(L) for j in range(L)
                                                              if i != j]
    while True:
        best_err, best = err, None
        for move in moves:
            cand = cur.copy()
            for i, d in move:
                cand[i] += d
            if min(cand) < 0 or clamp_schedule(cand, geometry.num_tokens, num_protected) != cand:
                continue
            e = abs(geometry.fraction(cand) - target)
            if e < best_err - 1e-12:
                best_err, best = e, cand
        if best is None:
            return cur
        cur, err = best, best_err
