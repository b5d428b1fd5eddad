#!/usr/bin/env python
"""Input pipeline speed on one core: the JPEG path vs the input cache, on a prepared VTAB-1k folder.

Every path runs in this process (loader ``num_workers=0``, one torch thread) through a ``DataLoader`` of
batch ``--batch-size`` over one split, repeated until ``--seconds`` have passed, after one untimed batch;
images per core = images delivered / CPU seconds of the process (user + system), so other load on the
machine does not count. Paths:

* ``jpeg``: what a run without the cache does -- decode, bicubic resize to ``--image-size``, ``ToTensor``,
  ``Normalize`` (float tensors delivered);
* ``first pass``: building the cache entry (decode + resize + store), once per split;
* ``cached``: reading the memory-mapped uint8 images (delivered as uint8; the normalisation runs on the
  device, :class:`~pyra_bench.data.transforms.Uint8Normalizer`);
* ``cached + CPU normalise``: the same plus that normalisation on this CPU (what a CPU-only run pays).

The last line is ``cached/jpeg: <ratio>x`` (images per core). ``--make-photos DIR`` first writes a folder
of ``--photo-size`` px JPEGs (smooth random images, JPEG quality 75 as the VTAB export) to measure on.

    python scripts/bench_data.py --data-root data/vtab-1k --task cifar100
    python scripts/bench_data.py --make-photos /tmp/photos --data-root /tmp/photos --task dtd
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from pyra_bench.data import VTABFolderDataset, build_transform, get_normalization  # noqa: E402
from pyra_bench.data.cache import CachedImages, ensure_cached  # noqa: E402
from pyra_bench.data.transforms import Uint8Normalizer  # noqa: E402
from pyra_bench.measure import cpu_name, device_slug, software_versions  # noqa: E402


def make_photos(root: Path, task: str, split: str, count: int, size: int, seed: int = 0) -> Path:
    """``count`` smooth random ``size`` px RGB JPEGs (quality 75) as ``<root>/<task>/<split>.txt``."""
    from PIL import Image

    from pyra_bench.data import get_task

    rng = np.random.default_rng(seed)
    n_cls = get_task(task).num_classes
    folder = root / task / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        coarse = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=75)
        lines.append(f"images/{split}/{i:06d}.jpg {i % n_cls}")
    (root / task / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root / task


def time_loader(loader: DataLoader, seconds: float, post=None) -> dict:
    """Images delivered per CPU second and per wall second, iterating ``loader`` until ``seconds``."""
    it = iter(loader)
    next(it)  # untimed: first batch (file system and allocator warm-up)
    n, c0, w0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - w0 < seconds:
        for x, _ in loader:
            if post is not None:
                x = post(x)
            n += len(x)
            if time.perf_counter() - w0 >= seconds:
                break
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"images": n, "cpu_s": cpu, "wall_s": wall, "img_per_cpu_s": n / cpu, "img_per_s": n / wall,
            "dtype": str(x.dtype).replace("torch.", "")}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--split", default="train800val200")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per path")
    p.add_argument("--normalization", default="imagenet")
    p.add_argument("--cache-dir", default=None, help="default: a temporary folder, removed afterwards")
    p.add_argument("--make-photos", default=None, metavar="DIR", help="first write a folder of synthetic photos")
    p.add_argument("--photo-size", type=int, default=256)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--label", default=None, help="name of the data in the output file (default: the task)")
    p.add_argument("--out-dir", default=None, help="write data_<device>_<label>.md / .json here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.make_photos:
        make_photos(Path(a.make_photos), a.task, a.split, a.count, a.photo_size)
    ds = VTABFolderDataset(a.data_root, a.task, a.split, build_transform(a.image_size, *get_normalization(a.normalization)))
    sizes = sorted({ds.load_image(i).size for i in range(0, len(ds), max(1, len(ds) // 20))})
    kw = dict(batch_size=a.batch_size, shuffle=False, num_workers=0)
    rows = {}
    print(f"{a.task}/{a.split}: {len(ds)} images (sizes e.g. {sizes[:3]}) -> {a.image_size} px, batch {a.batch_size}, "
          f"one core", flush=True)
    rows["jpeg"] = time_loader(DataLoader(ds, **kw), a.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(a.cache_dir or tmp)
        c0, w0 = time.process_time(), time.perf_counter()
        entry = ensure_cached(ds, a.image_size, cache_dir=cache_dir, workers=1, progress=False)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        rows["first pass (build)"] = {"images": len(ds), "cpu_s": cpu, "wall_s": wall, "img_per_cpu_s": len(ds) / cpu,
                                      "img_per_s": len(ds) / wall, "dtype": "uint8",
                                      "built_now": entry.built}
        cached = CachedImages(entry.path, ds.targets)
        rows["cached"] = time_loader(DataLoader(cached, **kw), a.seconds)
        norm = Uint8Normalizer.from_name(a.normalization)
        rows["cached + CPU normalise"] = time_loader(DataLoader(cached, **kw), a.seconds, post=norm)
        nbytes = entry.nbytes
    ratio = rows["cached"]["img_per_cpu_s"] / rows["jpeg"]["img_per_cpu_s"]
    ratio_cpu = rows["cached + CPU normalise"]["img_per_cpu_s"] / rows["jpeg"]["img_per_cpu_s"]
    label = a.label or a.task
    report = {"kind": "bench_data", "task": a.task, "label": label, "split": a.split, "images": len(ds),
              "source_sizes_sample": [list(s) for s in sizes], "image_size": a.image_size,
              "batch_size": a.batch_size, "cpu": cpu_name(), "cache_bytes": nbytes, "paths": rows,
              "cached_over_jpeg": ratio, "cached_cpu_normalise_over_jpeg": ratio_cpu, "versions": software_versions(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    lines = [f"# Input pipeline, one core: {label} ({a.task}/{a.split}) on {cpu_name()}", "",
             f"{len(ds)} images (source sizes e.g. {', '.join(f'{w}x{h}' for w, h in sizes[:4])}) delivered at "
             f"{a.image_size}x{a.image_size} in batches of {a.batch_size}, loader in-process (num_workers=0), one "
             f"torch thread; images per core = images / process CPU seconds (user + system), {a.seconds:g} s per "
             f"path. Cache entry: {nbytes / 1e9:.3f} GB. torch {torch.__version__}.", "",
             "| path | delivers | images / CPU s | images / wall s |", "|---|---|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['dtype']} | {r['img_per_cpu_s']:,.0f} | {r['img_per_s']:,.0f} |")
    lines += ["", f"cached + CPU normalise/jpeg: {ratio_cpu:.2f}x", f"cached/jpeg: {ratio:.2f}x"]
    md = "\n".join(lines) + "\n"
    if a.out_dir:
        stem = Path(a.out_dir) / f"data_{device_slug('cpu')}_{label}"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(md)
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + md, end="")
    return report


if __name__ == "__main__":
    main()
