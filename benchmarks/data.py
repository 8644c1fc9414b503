#!/usr/bin/env python
"""Input-pipeline throughput per CPU core: our ImageFolder source + train transform against torchvision.

Both read the same ImageNet-like JPEGs (generated once under --dir: ~500x375, quality 90, smooth
shapes plus sensor-like noise, ~100 KB each) and run the same recipe: RandomResizedCrop(224),
horizontal flip, ColorJitter(0.4, 0.4, 0.4), to tensor, ImageNet normalisation.
"ours" is `ImageFolder(dir, build_transform(...)).load(i, rng)`, the call DataLoader workers make;
"torchvision" is `torchvision.datasets.ImageFolder` with the v1 transforms on PIL images.
One process, one intra-op thread: a DataLoader worker is one core. Rates are images per CPU-second
of the process, so other load on the machine does not count against either. The two take turns,
one pass over all images each per round after a warm-up pass, and each reports the median of its
per-round rates, so drift in clocks or cache pressure hits both alike.

    python benchmarks/data.py                       # 300 images, ~20 s of timed rounds
    python benchmarks/data.py --tiny                # seconds: the test suite's smoke run
"""
from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs from a checkout without `pip install`

from vit.data.imagefolder import ImageFolder  # noqa: E402
from vit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform  # noqa: E402

# ImageNet's common shapes: most images are 500 px on the long side.
SIZES = [(500, 375), (375, 500), (500, 333), (500, 375), (500, 500), (333, 500), (500, 375), (500, 400)]
NUM_CLASSES = 10
# One 8x H100 node pretraining ViT-H/14 at 224 px: ~1 TFLOP per training image, ~50% MFU.
NODE_IMAGES_PER_S = 4000


def natural_jpeg(width: int, height: int, rng: np.random.Generator) -> bytes:
    """Smooth gradients, blurred shapes and noise: compresses like a photo (~100 KB at 500x375, q90)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / rng.uniform(20, 90) + rng.uniform(0, 6)) * 60
                     + np.cos(y / rng.uniform(20, 90)) * 60 + rng.uniform(60, 190) for _ in range(3)], -1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(8, 25)):
        x0, y0, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 120)
        draw.ellipse([x0, y0, x0 + r, y0 + r * rng.uniform(0.5, 1.5)], fill=tuple(rng.integers(0, 256, 3).tolist()))
    pixels = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32)
    pixels = pixels + rng.normal(0, 20, pixels.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def ensure_images(root: Path, count: int) -> list[Path]:
    """root/<synset>/<synset>_<i>.JPEG; existing images are kept, missing ones written."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        synset = f"n{i % NUM_CLASSES:08d}"
        path = root / synset / f"{synset}_{i}.JPEG"
        data = natural_jpeg(*SIZES[i % len(SIZES)], rng) if not path.exists() else None
        if data is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        paths.append(path)
    return paths


def torchvision_dataset(root: Path):
    from torchvision import datasets, transforms as T
    return datasets.ImageFolder(str(root), transform=T.Compose([
        T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4), T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/vit-data-bench", help="image folder (generated if missing)")
    p.add_argument("--images", type=int, default=300, help="images in the folder (default 300)")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds, both pipelines together")
    p.add_argument("--tiny", action="store_true", help="8 images, 2 short rounds: a smoke test")
    args = p.parse_args(argv)
    if args.tiny:
        args.images, args.seconds = 8, 0.0
    torch.set_num_threads(1)
    root = Path(args.dir)
    paths = ensure_images(root, args.images)
    ours = ImageFolder(str(root), build_transform({"img_size": 224}, train=True), cache_dir=None)
    theirs = torchvision_dataset(root)
    assert len(ours) == len(theirs) == len(paths), f"{root} holds other files: use a fresh --dir"
    sizes = [os.path.getsize(p) for p in paths]
    print(f"{len(paths)} JPEGs in {root}: ImageNet-like sizes (mostly 500x375), quality 90, "
          f"mean {np.mean(sizes) / 1e3:.0f} KB", flush=True)

    seed = random.Random(0)
    pipelines = {
        "ours": lambda i: ours.load(i, random.Random(seed.getrandbits(64))),
        "torchvision": lambda i: theirs[i],
    }
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    cpu_share = []
    for load in pipelines.values():  # warm-up: page cache, lazy imports
        for i in range(len(ours)):
            load(i)
    start = time.perf_counter()
    while min(len(r) for r in rates.values()) < 2 or time.perf_counter() - start < args.seconds:
        for name, load in pipelines.items():
            # CPU time of this process (one thread): images per core-second, even on a shared machine
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(len(ours)):
                image, _ = load(i)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            rates[name].append(len(ours) / cpu)
            cpu_share.append(cpu / wall)
    assert image.shape == (3, 224, 224)

    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in median.items():
        print(f"{name:12s} {rate:7.1f} img/s per core   ({NODE_IMAGES_PER_S / rate:5.1f} cores to feed "
              f"{NODE_IMAGES_PER_S} img/s, one H100 node)   median of {len(rates[name])} rounds")
    if statistics.median(cpu_share) < 0.9:
        print(f"note: the process had a core only {statistics.median(cpu_share):.0%} of the time: a shared machine")
    print(f"ratio ours/torchvision: {median['ours'] / median['torchvision']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
