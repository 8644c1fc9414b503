"""Tiny real-format datasets for the data-pipeline tests: PIL-written JPEGs in ImageFolder trees, the
ImageNet-21K distributions (fall11's per-synset tars, timm's WebDataset shards, ImageNet-21K-P), and
COCO / ADE20K trees whose objects and regions have one colour per class, so that tiny detectors and
segmenters can learn them."""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("n01440764", "n01443537", "n01484850")


def jpeg_bytes(width: int, height: int, seed: int, quality: int = 90, fmt: str = "JPEG") -> bytes:
    """A smooth colour gradient (so DCT-reduced decoding is comparable) plus mild noise, as JPEG
    (or `fmt`: PNG, WEBP)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(x * rng.uniform(2, 8) + y * rng.uniform(2, 8) + rng.uniform(0, 6)) for _ in range(3)]
    pixels = 127 + 100 * np.stack(channels, -1) + rng.normal(0, 4, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, fmt, quality=quality)
    return out.getvalue()


def make_imagefolder(root: Path, classes=CLASSES, per_class: int = 4, seed: int = 0) -> Path:
    """root/<synset>/<synset>_<i>.JPEG, sizes varying around 48x40, one PNG per class."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            data = jpeg_bytes(40 + 4 * (i % 5), 56 - 4 * (i % 5), seed=seed * 1000 + c * 100 + i)
            if i == per_class - 1:  # a PNG too, with an upper-case extension
                Image.open(io.BytesIO(data)).save(root / name / f"{name}_{i}.PNG")
            else:
                (root / name / f"{name}_{i}.JPEG").write_bytes(data)
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 1318000000
    tar.addfile(info, io.BytesIO(data))


def make_synset_tars(root: Path, classes=CLASSES, per_class: int = 6, outer: str | None = None) -> Path:
    """fall11's layout: one <wnid>.tar per synset of <wnid>_<id>.JPEG (the last one a PNG, as real JPEG
    names sometimes hide), in the folder root; with `outer`, those tars inside the release tar
    root/<outer> instead (returned)."""
    root.mkdir(parents=True)
    synset_tars = {}
    for c, wnid in enumerate(classes):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for i in range(per_class):
                fmt = "PNG" if i == per_class - 1 else "JPEG"
                _add(tar, f"{wnid}_{1000 + 37 * i}.JPEG",
                     jpeg_bytes(36 + 4 * (i % 3), 44 - 4 * (i % 3), seed=c * 100 + i, fmt=fmt))
        synset_tars[f"{wnid}.tar"] = buffer.getvalue()
    if outer is None:
        for name, data in synset_tars.items():
            (root / name).write_bytes(data)
        return root
    with tarfile.open(root / outer, "w") as tar:
        for name, data in synset_tars.items():
            _add(tar, name, data)
    return root / outer


def make_timm_wds(root: Path, classes=CLASSES, train_per_class: int = 6, val_per_class: int = 2,
                  shards: int = 2, image: str = "jpg", info: bool = True) -> Path:
    """timm's ImageNet-21K WebDataset shards: imagenet22k-{train,validation}-NNNN.tar in one folder,
    each sample <key>.jpg (or .webp), <key>.cls (the label as text) and <key>.json (label, class_name:
    the synset, width, height); with `info`, the _info.json naming each split's shards."""
    root.mkdir(parents=True)
    splits = {}
    for split, per_class in (("train", train_per_class), ("validation", val_per_class)):
        samples = [(c, wnid, i) for i in range(per_class) for c, wnid in enumerate(classes)]
        names, lengths = [], []
        for s in range(shards):
            name = f"imagenet22k-{split}-{s:04d}.tar"
            part = samples[s::shards]
            with tarfile.open(root / name, "w") as tar:
                for c, wnid, i in part:
                    key = f"{wnid}_{split[0]}{i}"
                    w, h = 40 + 4 * (i % 3), 36
                    _add(tar, f"{key}.{image}", jpeg_bytes(w, h, seed=1000 * (split != "train") + 100 * c + i,
                                                           fmt="WEBP" if image == "webp" else "JPEG"))
                    _add(tar, f"{key}.cls", str(c).encode())
                    _add(tar, f"{key}.json", json.dumps({"label": c, "class_name": wnid, "width": w,
                                                         "height": h}).encode())
            names.append(name)
            lengths.append(len(part))
        splits[split] = {"name": split, "filenames": names, "shard_lengths": lengths, "num_samples": sum(lengths)}
    if info:
        (root / "_info.json").write_text(json.dumps({"name": "imagenet-22k-tiny", "splits": splits}))
    return root


def make_21k_p(root: Path, classes=CLASSES, seed: int = 0) -> Path:
    """ImageNet-21K-P's layout: root/imagenet21k_{train,val}/<wnid>/<wnid>_<id>.JPEG with the same
    classes, and the imagenet21k_small_classes/ sibling of the classes it dropped."""
    make_imagefolder(root / "imagenet21k_train", classes, per_class=6, seed=seed)
    make_imagefolder(root / "imagenet21k_val", classes, per_class=2, seed=seed + 1)
    make_imagefolder(root / "imagenet21k_small_classes", ("n09999999",), per_class=2, seed=seed + 2)
    return root


def backdate(root: Path, seconds: float = 3600) -> None:
    """Set every mtime under root into the past, so that a later change shows in directory mtimes
    even on file systems whose timestamps tick coarsely."""
    past = time.time() - seconds
    for dirpath, _, files in os.walk(root):
        for path in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
            os.utime(path, (past, past))


# COCO category (id, name, colour): ids with a gap and listed out of order, like COCO's
COCO_CATEGORIES = ((7, "blue", (40, 60, 230)), (1, "red", (230, 40, 40)), (3, "green", (40, 200, 60)))
COCO_CROWD_IMAGE_ID = 1  # train image 1 also has an iscrowd=1 region, a cluster of small red squares
                         # given as uncompressed RLE, as COCO gives crowd regions


def _noise(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    return Image.fromarray(rng.integers(70, 186, (height, width, 3), dtype=np.uint8))


def _place(rng: np.random.Generator, width: int, height: int, taken: list, lo: float, hi: float):
    """An integer box (x, y, w, h) of lo..hi of each image side that overlaps no box in `taken`, or None."""
    for _ in range(20):
        w, h = int(rng.uniform(lo, hi) * width), int(rng.uniform(lo, hi) * height)
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if all(x + w <= a or a + c <= x or y + h <= b or b + d <= y for a, b, c, d in taken):
            taken.append((x, y, w, h))
            return x, y, w, h
    return None


def _polygon(x: int, y: int, w: int, h: int, ellipse: bool) -> list[float]:
    if not ellipse:
        return [x, y, x + w, y, x + w, y + h, x, y + h]
    angles = [2 * math.pi * k / 16 for k in range(16)]
    return [v for t in angles for v in (x + w / 2 * (1 + math.cos(t)), y + h / 2 * (1 + math.sin(t)))]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd-region segmentation: run lengths of 0s then 1s, alternating, in column-major order."""
    flat = mask.flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"counts": [0, *counts] if flat[0] else counts, "size": list(mask.shape)}


def make_coco(root: Path, n_train: int = 32, n_val: int = 8, size=(80, 128), seed: int = 0) -> Path:
    """root/{train2017,val2017}/<id:012d>.jpg and root/annotations/instances_*2017.json. Each image is
    noise with 1-3 non-overlapping filled rectangles or ellipses (20-60% of each side), coloured by
    category; sides are drawn from `size`, never square. The last image of each split has no objects."""
    rng = np.random.default_rng(seed)
    categories = [{"id": i, "name": name, "supercategory": "shape"} for i, name, _ in COCO_CATEGORIES]
    ann_id = 1
    for split, count, first_id in (("train", n_train, 1), ("val", n_val, 100001)):
        (root / f"{split}2017").mkdir(parents=True)
        images, annotations = [], []
        for image_id in range(first_id, first_id + count):
            width = height = 0
            while width == height:
                width, height = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
            img, taken = _noise(rng, width, height), []
            draw = ImageDraw.Draw(img)
            objects = []
            crowd_mask = np.zeros((height, width), dtype=np.uint8)
            if split == "train" and image_id == COCO_CROWD_IMAGE_ID:
                x, y, w, h = _place(rng, width, height, taken, 0.3, 0.35)
                for i in range(3):
                    for j in range(3):
                        draw.rectangle((x + w * i // 3, y + h * j // 3, x + w * i // 3 + 3, y + h * j // 3 + 3),
                                       fill=COCO_CATEGORIES[1][2])
                        crowd_mask[y + h * j // 3:y + h * j // 3 + 4, x + w * i // 3:x + w * i // 3 + 4] = 1
                objects.append((1, (x, y, w, h), False, 1))
            if image_id != first_id + count - 1:
                for _ in range(int(rng.integers(1, 4))):
                    box = _place(rng, width, height, taken, 0.2, 0.6)
                    if box is not None:
                        objects.append((int(rng.integers(len(COCO_CATEGORIES))), box, bool(rng.integers(2)), 0))
            for c, (x, y, w, h), ellipse, crowd in objects:
                if not crowd:
                    (draw.ellipse if ellipse else draw.rectangle)((x, y, x + w - 1, y + h - 1),
                                                                  fill=COCO_CATEGORIES[c][2])
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": COCO_CATEGORIES[c][0], "bbox": [x, y, w, h],
                    "area": int(crowd_mask.sum()) if crowd else math.pi * w * h / 4 if ellipse else w * h,
                    "segmentation": _uncompressed_rle(crowd_mask) if crowd else [_polygon(x, y, w, h, ellipse)],
                    "iscrowd": crowd})
                ann_id += 1
            file_name = f"{image_id:012d}.jpg"
            img.save(root / f"{split}2017" / file_name, "JPEG", quality=95)
            images.append({"id": image_id, "file_name": file_name, "width": width, "height": height,
                           "license": 1, "date_captured": "2024-01-01 00:00:00"})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps({
            "info": {"description": "tiny COCO-format test set", "version": "1.0", "year": 2024},
            "licenses": [{"id": 1, "name": "test", "url": ""}],
            "images": images, "annotations": annotations, "categories": categories}))
    return root


# ADE20K label value -> colour; 0 is "other", which training ignores
ADE_COLOURS = {0: (110, 110, 110), 1: (220, 50, 50), 2: (50, 190, 60), 3: (50, 60, 220), 5: (230, 210, 40)}


def make_ade20k(root: Path, n_train: int = 16, n_val: int = 4, seed: int = 0) -> Path:
    """root/ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_*_<8 digits>.{jpg,png}:
    a background value and 1-3 rectangles or ellipses of other values, each value in its colour
    plus noise; 64-128 px sides. Returns the ADEChallengeData2016 directory."""
    rng = np.random.default_rng(seed)
    ade = root / "ADEChallengeData2016"
    values = sorted(ADE_COLOURS)
    palette = np.array([ADE_COLOURS.get(v, (0, 0, 0)) for v in range(256)], dtype=np.float64)
    for split, count, prefix in (("training", n_train, "ADE_train"), ("validation", n_val, "ADE_val")):
        for kind in ("images", "annotations"):
            (ade / kind / split).mkdir(parents=True)
        for i in range(1, count + 1):
            width, height = (int(v) for v in rng.integers(64, 129, 2))
            background = int(rng.choice(values)) if i % 2 else 0  # "other" as background in half the images
            label = Image.new("L", (width, height), background)
            draw = ImageDraw.Draw(label)
            for _ in range(int(rng.integers(1, 4))):
                w, h = int(rng.uniform(0.3, 0.7) * width), int(rng.uniform(0.3, 0.7) * height)
                x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                (draw.ellipse if rng.integers(2) else draw.rectangle)(
                    (x, y, x + w - 1, y + h - 1), fill=int(rng.choice(values)))
            pixels = palette[np.array(label)] + rng.normal(0, 8, (height, width, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                ade / "images" / split / f"{prefix}_{i:08d}.jpg", "JPEG", quality=95)
            label.save(ade / "annotations" / split / f"{prefix}_{i:08d}.png")
    return ade
