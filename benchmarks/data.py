#!/usr/bin/env python
"""Input-pipeline throughput per CPU core: our sources + train transform, in each ImageNet-21K layout,
against torchvision's ImageFolder; and the time to build each layout's index.

All read the same ImageNet-like JPEGs (generated once under --dir: ~500x375, quality 90, smooth
shapes plus sensor-like noise, ~100 KB each) and run the same recipe: RandomResizedCrop(224),
horizontal flip, ColorJitter(0.4, 0.4, 0.4), to tensor, ImageNet normalisation. Our layouts:
"imagefolder" (the tree), "synset_tars" (the same JPEGs in per-synset tars inside one outer
release tar, as fall11_whole.tar), "timm_jpg" and "timm_webp" (timm's WebDataset shards, the
latter re-encoded as WebP at quality 90 like imagenet-w21-webp-wds). Each is `source.load(i, rng)`,
the call DataLoader workers make; "torchvision" is `torchvision.datasets.ImageFolder` with the v1
transforms on PIL images.
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
import json
import os
import random
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs from a checkout without `pip install`

from vit.data.imagefolder import ImageFolder  # noqa: E402
from vit.data.shards import Shards  # noqa: E402
from vit.data.synset_tars import SynsetTars  # noqa: E402
from vit.data.transforms import build_transform  # noqa: E402

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


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def ensure_layouts(root: Path, paths: list[Path]) -> dict[str, Path]:
    """The images of the tree `root` as fall11's outer tar of per-synset tars and as timm's shards
    (JPEG and WebP), beside it; written once."""
    out = root.parent / f"{root.name}-layouts"
    layouts = {"synset_tars": out / "fall11" / "fall11_whole.tar", "timm_jpg": out / "timm-jpg",
               "timm_webp": out / "timm-webp"}
    if (out / "done").exists():
        return layouts
    shutil.rmtree(out, ignore_errors=True)
    synsets = sorted({p.parent.name for p in paths})
    layouts["synset_tars"].parent.mkdir(parents=True)
    with tarfile.open(layouts["synset_tars"], "w") as outer:
        for synset in synsets:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for p in paths:
                    if p.parent.name == synset:
                        _add(tar, p.name, p.read_bytes())
            _add(outer, f"{synset}.tar", inner.getvalue())
    for name, ext in (("timm_jpg", "jpg"), ("timm_webp", "webp")):
        layouts[name].mkdir(parents=True)
        with tarfile.open(layouts[name] / "imagenet22k-train-0000.tar", "w") as tar:
            for p in paths:
                data = p.read_bytes()
                if ext == "webp":
                    webp = io.BytesIO()
                    Image.open(io.BytesIO(data)).save(webp, "WEBP", quality=90)
                    data = webp.getvalue()
                label = synsets.index(p.parent.name)
                _add(tar, f"{p.stem}.{ext}", data)
                _add(tar, f"{p.stem}.cls", str(label).encode())
                _add(tar, f"{p.stem}.json", json.dumps({"label": label, "class_name": p.parent.name}).encode())
    (out / "done").touch()
    return layouts


def timed_index(build) -> tuple[object, float]:
    """A source built with no cached index (a fresh cache dir, the data's own cache removed) and the seconds it took."""
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        source = build(cache)
        return source, time.perf_counter() - start


def recipe_data() -> dict:
    """The seed recipe's data config (conf/), whose augmentation both pipelines run."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("pretrain").data, resolve=True)


def torchvision_dataset(root: Path, data: dict):
    from torchvision import datasets
    from torchvision import transforms as T
    return datasets.ImageFolder(str(root), transform=T.Compose([
        T.RandomResizedCrop(data["img_size"], data["scale"], data["ratio"]), T.RandomHorizontalFlip(data["hflip"]),
        T.ColorJitter(*[data["color_jitter"]] * 3), T.ToTensor(), T.Normalize(data["mean"], data["std"])]))


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
    layouts = ensure_layouts(root, paths)
    for cache in [root / ".imagefolder-index.npz", layouts["synset_tars"].parent / ".synset-index-fall11_whole.tar.npz",
                  layouts["timm_jpg"] / ".shard-index.npz", layouts["timm_webp"] / ".shard-index.npz"]:
        cache.unlink(missing_ok=True)  # to time each index build; the sources then cache in a temporary dir
    data = recipe_data()
    transform = build_transform(data, train=True)
    sources, index_s = {}, {}
    for name, build in {
        "imagefolder": lambda cache: ImageFolder(str(root), transform, cache_dir=cache),
        "synset_tars": lambda cache: SynsetTars(str(layouts["synset_tars"]), transform, cache_dir=cache),
        "timm_jpg": lambda cache: Shards(str(layouts["timm_jpg"]), transform, cache_dir=cache),
        "timm_webp": lambda cache: Shards(str(layouts["timm_webp"]), transform, cache_dir=cache),
    }.items():
        sources[name], index_s[name] = timed_index(build)
    theirs = torchvision_dataset(root, data)
    assert all(len(s) == len(theirs) == len(paths) for s in sources.values()), \
        f"{root} holds other files: use a fresh --dir"
    sizes = [os.path.getsize(p) for p in paths]
    print(f"{len(paths)} JPEGs in {root}: ImageNet-like sizes (mostly 500x375), quality 90, "
          f"mean {np.mean(sizes) / 1e3:.0f} KB", flush=True)
    print("index build of " + str(len(paths)) + " images: "
          + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in index_s.items()), flush=True)

    seed = random.Random(0)
    pipelines = {name: (lambda source: lambda i: source.load(i, random.Random(seed.getrandbits(64))))(source)
                 for name, source in sources.items()}
    pipelines["torchvision"] = lambda i: theirs[i]
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    cpu_share = []
    for load in pipelines.values():  # warm-up: page cache, lazy imports
        for i in range(len(theirs)):
            load(i)
    start = time.perf_counter()
    while min(len(r) for r in rates.values()) < 2 or time.perf_counter() - start < args.seconds:
        for name, load in pipelines.items():
            # CPU time of this process (one thread): images per core-second, even on a shared machine
            cpu, wall = time.process_time(), time.perf_counter()
            for i in range(len(theirs)):
                image, _ = load(i)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            rates[name].append(len(theirs) / cpu)
            cpu_share.append(cpu / wall)
    assert image.shape == (3, 224, 224)

    median = {name: statistics.median(r) for name, r in rates.items()}
    for name, rate in median.items():
        print(f"{name:12s} {rate:7.1f} img/s per core   ({NODE_IMAGES_PER_S / rate:5.1f} cores to feed "
              f"{NODE_IMAGES_PER_S} img/s, one H100 node)   median of {len(rates[name])} rounds")
    if statistics.median(cpu_share) < 0.9:
        print(f"note: the process had a core only {statistics.median(cpu_share):.0%} of the time: a shared machine")
    print("ratio ours/torchvision: " + ", ".join(f"{name} {median[name] / median['torchvision']:.2f}x"
                                                  for name in sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
