"""Merging schedules: how many tokens each block merges (``r`` per layer, spec section 2).

Accepted forms (:func:`resolve_schedule`):

* ``"none"`` / ``None`` / ``0``      -> no merging
* a preset name, e.g. ``"low"`` / ``"high"`` -> the paper's schedule for the backbone's family
* an int ``r`` or ``"r16"``          -> constant r in every block (ToMe)
* ``[r_0, ..., r_{L-1}]``            -> per-layer list (shorter lists are padded with zeros, as ToMe does)
* ``{"r": 16, "inflection": -0.5}`` or ``"tome:16,-0.5"`` -> ToMe's linear schedule with an inflection

A schedule asking a layer for more merges than it has mergeable tokens is an error at build time
(:func:`check_schedule`), naming the layer and its token count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from ..registry import UnknownChoiceError
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
    pass


def tome_linear_schedule(num_layers: int, r: int, inflection: float = 0.0) -> list[int]:
    """ToMe's ``parse_r`` for ``(r, inflection)``: linear from r(1-inflect) to r(1+inflect)."""
    min_val = int(r * (1.0 - inflection))
    max_val = 2 * r - min_val
    step = (max_val - min_val) / max(num_layers - 1, 1)
    return [int(min_val + step * i) for i in range(num_layers)]


def resolve_schedule(spec: Any, num_layers: int, family: str | None = None) -> list[int]:
    """Turn any accepted schedule form into a list of ``num_layers`` non-negative ints."""
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "", "0")):
        return [0] * num_layers
    if hasattr(spec, "items") and not isinstance(spec, str):  # dict / DictConfig
        spec = dict(spec)
        if "r" not in spec:
            raise ScheduleError(f"a schedule mapping needs key 'r' (and optionally 'inflection'), got {spec}")
        return tome_linear_schedule(num_layers, int(spec["r"]), float(spec.get("inflection", 0.0)))
    if isinstance(spec, bool):
        raise ScheduleError(f"invalid schedule {spec!r}")
    if isinstance(spec, int):
        return [spec] * num_layers
    if isinstance(spec, str):
        s = spec.strip()
        if s.startswith("tome:"):
            r, _, inf = s[5:].partition(",")
            return tome_linear_schedule(num_layers, int(r), float(inf or 0.0))
        if s.startswith("r") and s[1:].isdigit():
            return [int(s[1:])] * num_layers
        if s.isdigit():
            return [int(s)] * num_layers
        presets = PRESETS.get(family or "", {})
        if s not in presets:
            valid = sorted(presets) + ["none", "r<N>", "tome:<r>,<inflection>", "[r_0, ..., r_L-1]"]
            raise UnknownChoiceError(f"schedule for backbone family {family!r}", s, valid)
        spec = presets[s]
    if isinstance(spec, Sequence):
        r = [int(v) for v in spec]
        if len(r) > num_layers:
            raise ScheduleError(f"schedule has {len(r)} entries but the backbone has {num_layers} blocks")
        return r + [0] * (num_layers - len(r))
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
