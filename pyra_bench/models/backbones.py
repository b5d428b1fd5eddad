"""Backbones: one declarative entry per pre-trained ViT of the paper (spec section 9) plus tiny ones.

Each :class:`BackboneSpec` names the timm architecture (with the exact pretrained tag), the LoRA rank the
paper uses with it, the family of merging-schedule presets, and the smaller backbone of Table 3's PEFT*.
Weights come from the hub (``pretrained=True``, needs the network) or from a local file
(``checkpoint=...``: ``.npz`` of the original ViT release, ``.pth``/``.bin``, ``.safetensors``), offline.

Any other timm ``VisionTransformer`` works from a config alone (:func:`backbone_spec_from_config`): give
``timm_name`` (and ``lora_rank``); a registered name's fields can be overridden the same way (``kwargs``:
e.g. ``depth``, ``class_token: false`` with ``global_pool: avg``). Prefix tokens (class, distillation,
register tokens) are protected from merging and pruning; CLIP's pre-norm and DINOv2's layer scale are
patched like the rest; what the patch cannot handle (other block or attention classes, attention-pool or
max-pool heads, hybrid stems) is refused by name when the model is built.

The labelled merge variants (``backbone.merge_split`` / ``backbone.merge_site``) are backbone config keys
too; their choices live in :mod:`pyra_bench.models.variants`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, InputFileNotFoundError, UnsupportedModelError
from ..registry import Registry, UnknownChoiceError
from .variants import MERGE_VARIANTS

if TYPE_CHECKING:  # the registry is read without torch or timm (listings, --help); building imports them
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn

log = logging.getLogger("pyra_bench")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str | None  # None: built from ``kwargs`` with timm's VisionTransformer class
    lora_rank: int
    schedule_family: str | None
    smaller: str | None = None  # PEFT* comparison backbone (Table 3)
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    paper_params_m: float | None = None  # backbone size the paper's "# params" % divides by (millions)
    display_name: str = ""  # how tables and figures name it, e.g. "ViT-B/16"
    #: ``peft=adapter``'s bottleneck (None: ``lora_rank``: the official code's 4 / 8 / 12 for ViT-S / B / L)
    adapter_dim: int | None = None

    @property
    def peft_dim(self) -> int:
        """The adapter bottleneck ``peft.dim: null`` means."""
        return int(self.adapter_dim if self.adapter_dim is not None else self.lora_rank)

    @property
    def label(self) -> str:
        """The display name (the registry name when none is set)."""
        return self.display_name or self.name


BACKBONES: Registry[BackboneSpec] = Registry("backbone")

def _add(spec: BackboneSpec) -> None:
    BACKBONES.add(spec.name, spec)


_add(BackboneSpec("vit_b16_in21k", "vit_base_patch16_224.orig_in21k", 8, "vit_b", "vit_s16_in21k",
                  description="ViT-B/16, ImageNet-21K, original Google release (ViT-B_16.npz)",
                  display_name="ViT-B/16"))
_add(BackboneSpec("vit_l16_in21k", "vit_large_patch16_224.orig_in21k", 12, "vit_l", "vit_b16_in21k",
                  description="ViT-L/16, ImageNet-21K, original Google release (ViT-L_16.npz)",
                  display_name="ViT-L/16"))
_add(BackboneSpec("vit_s16_in21k", "vit_small_patch16_224.augreg_in21k", 4, None,
                  description="ViT-S/16, ImageNet-21K (AugReg; no original-release ViT-S exists)",
                  display_name="ViT-S/16"))
_add(BackboneSpec("vit_l16_mae", "vit_large_patch16_224.mae", 12, "vit_l", "vit_b16_mae",
                  kwargs={"global_pool": "token"}, description="ViT-L/16, MAE self-supervised (class-token head)",
                  display_name="ViT-L/16 (MAE)"))
_add(BackboneSpec("vit_b16_mae", "vit_base_patch16_224.mae", 8, "vit_b",
                  kwargs={"global_pool": "token"}, description="ViT-B/16, MAE self-supervised (class-token head)",
                  display_name="ViT-B/16 (MAE)"))
_add(BackboneSpec("deit_b16_distilled", "deit_base_distilled_patch16_224.fb_in1k", 8, "deit_b", "deit_s16_distilled",
                  description="DeiT-B distilled (class + distillation token)", display_name="DeiT-B"))
_add(BackboneSpec("deit_s16_distilled", "deit_small_distilled_patch16_224.fb_in1k", 4, None,
                  description="DeiT-S distilled (class + distillation token)", display_name="DeiT-S"))
# Any timm VisionTransformer: pre-norm (CLIP) and register tokens with layer scale (DINOv2).
_add(BackboneSpec("clip_b16", "vit_base_patch16_clip_224.openai", 8, "vit_b", "vit_s16_in21k",
                  description="CLIP ViT-B/16 (OpenAI), pre-norm image tower, class-token head",
                  display_name="CLIP ViT-B/16"))
_add(BackboneSpec("dinov2_vits14_reg4", "vit_small_patch14_reg4_dinov2.lvd142m", 4, None,
                  kwargs={"img_size": 224},
                  description="DINOv2 ViT-S/14 with 4 register tokens (LayerScale), at 224 px (256 patches + 5 "
                              "prefix tokens)", display_name="DINOv2-reg ViT-S/14"))
# Tiny architectures for tests and the offline demo (random init unless a checkpoint is given).
_add(BackboneSpec("vit_tiny_test", None, 2, "tiny", kwargs=dict(
    img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0, qkv_bias=True),
    description="3-block, 48-wide ViT on 32x32 images (17 tokens), for tests", display_name="ViT-tiny (test)"))
_add(BackboneSpec("vit_demo_mnist", None, 4, "demo", kwargs=dict(
    img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=4.0, qkv_bias=True),
    description="4-block, 96-wide ViT on 32x32 images (65 tokens), pre-trained by pyra_bench on MNIST",
    display_name="ViT-demo (MNIST)"))


class CheckpointError(ConfigError):
    """A weights file that cannot be read or does not fit the backbone."""


def get_backbone(name: str) -> BackboneSpec:
    return BACKBONES.get(name)


#: Backbone-config keys that define the architecture (:class:`BackboneSpec` fields).
SPEC_KEYS = ("timm_name", "lora_rank", "schedule_family", "display_name", "smaller", "description", "kwargs",
             "paper_params_m", "adapter_dim")
#: Backbone-config keys the run reads elsewhere (weights, transform, attention).
RUN_KEYS = ("name", "weights", "image_size", "normalization", "prop_attn", *MERGE_VARIANTS)


def backbone_spec_from_config(bcfg: Mapping[str, Any]) -> BackboneSpec:
    """The :class:`BackboneSpec` a backbone config (``conf/backbone/*.yaml``) describes.

    A registered ``name`` gives its spec, with every field the config sets (not null) overriding it; an
    unregistered name needs ``timm_name`` (any timm ViT, optionally with a pretrained tag) and
    ``lora_rank``. ``image_size`` (when set) becomes the model's ``img_size``, so positional embeddings fit
    the images (timm resamples pretrained ones). ``schedule_family: none`` = no preset schedules (then use
    ``r<N>``, ``tome:...``, ``flops:<f>`` or ``speedup:<x>``). ``kwargs``: extra ``timm.create_model``
    arguments. ``weights``, ``normalization``, ``prop_attn`` and the merge variants are read by the run.
    """
    if hasattr(bcfg, "_metadata"):  # an OmegaConf DictConfig
        from omegaconf import OmegaConf

        bcfg = OmegaConf.to_container(bcfg, resolve=True)
    cfg = dict(bcfg)
    unknown = sorted(set(cfg) - set(SPEC_KEYS) - set(RUN_KEYS))
    if unknown:
        raise ConfigError(f"unknown backbone config key(s) {', '.join(unknown)}; valid keys: "
                          f"{', '.join(sorted(SPEC_KEYS + RUN_KEYS))}")
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a backbone config needs a name, got {name!r}")
    given = {k: cfg[k] for k in SPEC_KEYS if cfg.get(k) is not None}
    for key in ("lora_rank", "adapter_dim"):
        if key in given and (isinstance(given[key], bool) or not isinstance(given[key], int) or given[key] < 1):
            raise ConfigError(f"backbone {name!r}: {key} must be a positive int, got {given[key]!r}")
    if "schedule_family" in given:
        from .schedules import PRESETS

        fam = given["schedule_family"]
        if isinstance(fam, str) and fam.lower() == "none":
            given["schedule_family"] = None
        elif fam not in PRESETS:
            raise UnknownChoiceError(f"schedule family of backbone {name!r}", str(fam), [*PRESETS, "none"])
    if "kwargs" in given and not isinstance(given["kwargs"], Mapping):
        raise ConfigError(f"backbone {name!r}: kwargs must be a mapping of timm.create_model arguments")
    import timm

    if "timm_name" in given and not timm.is_model(given["timm_name"]):
        raise ConfigError(f"backbone {name!r}: timm has no model {given['timm_name']!r} (list candidates with "
                          f"python -c \"import timm; print(timm.list_models('*{given['timm_name'].split('.')[0]}*'))\")")
    if name in BACKBONES:
        base = get_backbone(name)
    elif "timm_name" in given:
        if "lora_rank" not in given:
            raise ConfigError(f"backbone {name!r} is not registered: give its lora_rank (the paper uses 8 for "
                              "ViT-B, 12 for ViT-L, 4 for ViT-S)")
        base = BackboneSpec(name, given["timm_name"], given["lora_rank"], None,
                            description=f"timm {given['timm_name']} (from its backbone config)")
    else:
        raise UnknownChoiceError("backbone", name, [*BACKBONES.names(), "<any name> with timm_name=<timm model>"])
    kwargs = {**base.kwargs, **dict(given.pop("kwargs", {}))}
    if cfg.get("image_size") is not None:
        size = cfg["image_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"backbone {name!r}: image_size must be a positive int, got {size!r}")
        kwargs["img_size"] = size
    return replace(base, **given, kwargs=kwargs)


def create_backbone(
    spec: BackboneSpec | str,
    num_classes: int,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> VisionTransformer:
    """Create the backbone with a fresh ``num_classes`` head; load hub or local weights (not the head)."""
    if isinstance(spec, str):
        spec = get_backbone(spec)
    if checkpoint is not None and pretrained:
        raise ConfigError("give either pretrained=True (hub) or checkpoint=<file>, not both")
    if checkpoint is not None:
        checkpoint = Path(checkpoint).expanduser()
        if not checkpoint.is_file():
            raise InputFileNotFoundError(f"checkpoint file not found: {checkpoint}")
    kwargs = {**spec.kwargs, **overrides, "drop_path_rate": drop_path_rate}
    import timm
    from timm.models.vision_transformer import VisionTransformer

    try:
        if spec.timm_name is None:
            model = VisionTransformer(num_classes=num_classes, **kwargs)
        else:
            model = timm.create_model(spec.timm_name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as e:  # e.g. img_size given to a model that is no ViT
        raise UnsupportedModelError(f"backbone {spec.name!r} (timm {spec.timm_name}) cannot be built as a timm "
                                    f"VisionTransformer with {sorted(kwargs)}: {e}") from None
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, spec.name)
    return model


def _head_keys(model: nn.Module) -> set[str]:
    return {k for k in model.state_dict() if k.startswith(("head.", "head_dist.", "fc_norm."))}


class _DropTimmLoadLine(logging.Filter):
    """timm's ``load_state_dict`` logs ``Loaded <key> from checkpoint '<file>'``, where ``<key>`` is the
    wrapper key the weights sat under -- empty for a plain state dict (``Loaded  from checkpoint``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (str(record.msg).startswith("Loaded ") and " from checkpoint '" in str(record.msg))


@contextlib.contextmanager
def _own_load_line() -> Iterator[None]:
    """While reading a checkpoint through timm: its load line is dropped (:func:`load_checkpoint` logs one
    naming the backbone instead)."""
    timm_log, drop = logging.getLogger("timm.models._helpers"), _DropTimmLoadLine()
    timm_log.addFilter(drop)
    try:
        yield
    finally:
        timm_log.removeFilter(drop)


def load_checkpoint(model: VisionTransformer, path: str | os.PathLike, backbone: str = "?") -> None:
    """Load backbone weights from a local file, refusing clearly a file that does not fit.

    ``.npz``: the original ViT release's format, via timm's loader. ``.pth``/``.pt``/``.bin``/``.safetensors``:
    a state dict (optionally under ``model``/``state_dict``), passed through timm's ViT checkpoint filter
    (which converts MAE/DeiT/JAX-style keys and resamples position embeddings). Classifier weights are
    never taken from the file: the head is task-specific.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        from timm.models.vision_transformer import _load_weights

        head = {k: v.clone() for k, v in model.state_dict().items() if k in _head_keys(model)}
        try:
            _load_weights(model, str(path))
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path} does not fit backbone {backbone!r}: {e}") from e
        model.load_state_dict(head, strict=False)
        return
    if suffix not in (".pth", ".pt", ".bin", ".safetensors", ".ckpt"):
        raise CheckpointError(f"unsupported checkpoint format {suffix!r} ({path}); use .npz, .pth, .bin or .safetensors")
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    def read() -> dict:
        if suffix == ".safetensors":
            return load_state_dict(str(path))
        try:
            return load_state_dict(str(path), weights_only=True)
        except TypeError:  # timm < 1.0.9 has no weights_only (torch >= 2.6 defaults to it anyway)
            return load_state_dict(str(path))

    try:
        with _own_load_line():
            state = read()
    except Exception as e:  # noqa: BLE001 - any read error becomes a clear message
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    log.info("backbone %s: weights from checkpoint '%s' (%d tensors)", backbone, path, len(state))
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} does not look like a ViT checkpoint for {backbone!r}: {e}") from e
    heads = _head_keys(model)
    state = {k: v for k, v in state.items() if k not in heads}
    own = model.state_dict()
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(k for k in own if k not in state and k not in heads)
    unexpected = sorted(k for k in state if k not in own)
    if bad_shapes or missing or unexpected:
        lines = [f"checkpoint {path} does not fit backbone {backbone!r}:"]
        if bad_shapes:
            lines.append(f"  {len(bad_shapes)} shape mismatch(es), e.g. " + "; ".join(bad_shapes[:3]))
        if missing:
            lines.append(f"  {len(missing)} missing key(s), e.g. {', '.join(missing[:5])}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:5])}")
        raise CheckpointError("\n".join(lines))
    import torch

    with torch.no_grad():
        model.load_state_dict(state, strict=False)
