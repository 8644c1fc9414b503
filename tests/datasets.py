"""Tiny real-format datasets for the data-pipeline tests: PIL-written JPEGs in ImageFolder trees."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("n01440764", "n01443537", "n01484850")


def jpeg_bytes(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A smooth colour gradient (so DCT-reduced decoding is comparable) plus mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(x * rng.uniform(2, 8) + y * rng.uniform(2, 8) + rng.uniform(0, 6)) for _ in range(3)]
    pixels = 127 + 100 * np.stack(channels, -1) + rng.normal(0, 4, (height, width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=quality)
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


def backdate(root: Path, seconds: float = 3600) -> None:
    """Set every mtime under root into the past, so that a later change shows in directory mtimes
    even on file systems whose timestamps tick coarsely."""
    past = time.time() - seconds
    for dirpath, _, files in os.walk(root):
        for path in [dirpath, *(os.path.join(dirpath, f) for f in files)]:
            os.utime(path, (past, past))
