"""The labelled merge variants: which of the paper's readings of ToMe's merge a run uses.

Backbone config keys (``backbone.merge_split``, ``backbone.merge_site``) whose first choice is the official
code's; only a non-default value enters the run id. Torch-free, so listings and run ids read it cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..registry import UnknownChoiceError

#: The labelled merge variants (backbone config keys) and their choices, the official code's first:
#: ``merge_split`` -- ToMe's bipartite split: ``alternate`` (even/odd tokens, the official code) or
#: ``random`` (a random partition per image and forward in training, as the paper's Eq. 2 reads;
#: alternate in eval, so evaluation and timing are deterministic); ``merge_site`` -- where a block merges:
#: ``after_attention`` (between attention and MLP, the official code) or ``before_attention`` (the block's
#: input, before its attention, as the paper's Fig. 3; the similarity is then the tokens' own cosine, Eq. 3).
MERGE_VARIANTS: dict[str, tuple[str, ...]] = {
    "merge_split": ("alternate", "random"),
    "merge_site": ("after_attention", "before_attention"),
}
#: One line each, for listings (``pyra-info options``).
MERGE_VARIANT_HELP = {
    "merge_split": "ToMe's bipartite split (tome, pyra): alternate = even/odd tokens (official code) | random = a "
                   "random partition per image and forward in training, alternate in eval (the paper's Eq. 2)",
    "merge_site": "where a block merges (tome, pyra): after_attention = between attention and MLP (official code) | "
                  "before_attention = the block's input, matched on the tokens (the paper's Fig. 3 / Eq. 3)",
}


class UnknownVariantError(UnknownChoiceError, ConfigError):
    """A merge variant's value that is not one of its choices (a bad config value: a ``ConfigError``)."""


def check_variant(key: str, value: Any) -> str:
    """``value`` of the merge variant ``key`` (``merge_split`` / ``merge_site``), or
    :class:`UnknownVariantError` naming the valid choices: the one check of a variant's value, for configs
    (:func:`merge_variants`) and the Python API (``build_model``, ``patch_vit``, ``ToMeMerge``) alike."""
    if value not in MERGE_VARIANTS[key]:
        raise UnknownVariantError(f"backbone.{key}", str(value), list(MERGE_VARIANTS[key]))
    return str(value)


def merge_variants(bcfg: Mapping[str, Any]) -> dict[str, str]:
    """``{"merge_split": ..., "merge_site": ...}`` of a backbone config (absent: the defaults), checked."""
    return {key: check_variant(key, choices[0] if bcfg.get(key) is None else bcfg.get(key))
            for key, choices in MERGE_VARIANTS.items()}


def variant_suffix(bcfg: Mapping[str, Any]) -> str:
    """The merge variants' part of a run id after the backbone name: ``-merge_split=random`` etc., only for
    non-default values (so ids of runs with the defaults, older ones included, do not change)."""
    return "".join(f"-{k}={v}" for k, v in merge_variants(bcfg).items() if v != MERGE_VARIANTS[k][0])
