"""ADE20K semantic segmentation (the SceneParsing release, ADEChallengeData2016) as a Source.

Layout: <root>/images/{training,validation}/<stem>.jpg with <root>/annotations/<same>/<stem>.png,
single-channel PNGs of 0 ("other") and the classes 1..150. `reduce_zero_label` maps "other" to
the ignore index and the classes to 0..149 as soon as a PNG is read; no other code shifts labels.

Training follows mmsegmentation's ADE20K pipeline: random keep-ratio resize of (2048, 512) by
r ~ U(ratio_range), a random crop that avoids crops dominated by one class, flip, photometric
distortion, then padding to the crop size (image 0 after normalisation, label = ignore). Eval
resizes the image by the same rule at r = 1 and keeps the label at its original resolution, so
predictions are upsampled to it and scored at full resolution, as mmseg does.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vit.data.transforms import _Normalize, decode, open_image
from vit.errors import DataError

SPLITS = {"train": "training", "val": "validation"}
CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
IGNORE_INDEX = 255


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """PNG values -> training labels: 0 ("other") -> 255 (ignored), v -> v - 1 (0..149)."""
    return np.where(label == 0, IGNORE_INDEX, label.astype(np.int16) - 1).astype(np.uint8)


def check_ade20k(root: str) -> None:
    """DataError naming data.root for a wrong layout; reads each image directory up to its first image."""
    if not os.path.isdir(root):
        raise DataError(f"data.root: {root} does not exist or is not a directory; "
                        "point data.root at the ADEChallengeData2016 directory")
    if os.path.isdir(os.path.join(root, "ADEChallengeData2016")):
        raise DataError(f"data.root: {root} contains ADEChallengeData2016/; point data.root at that directory")
    for split in SPLITS.values():
        for kind in ("images", "annotations"):
            if not os.path.isdir(os.path.join(root, kind, split)):
                raise DataError(f"data.root: {root} has no {kind}/{split}/ directory; "
                                "point data.root at the ADEChallengeData2016 directory")
        with os.scandir(os.path.join(root, "images", split)) as entries:
            if not any(e.name.endswith(".jpg") for e in entries):
                raise DataError(f"data.root: {root}/images/{split} has no .jpg images; "
                                "point data.root at a complete ADEChallengeData2016 directory")


def keep_ratio_size(width: int, height: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv's rescale: the largest size of this aspect with long side <= scale[0], short side <= scale[1]."""
    factor = min(max(scale) / max(width, height), min(scale) / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def _stems(directory: Path, suffix: str) -> set[str]:
    return {name[:-len(suffix)] for name in os.listdir(directory) if name.endswith(suffix)}


class ADE20K:
    """Map-style source: train (image [3, S, S], label int64 [S, S]); eval (image [3, h', w'],
    label int64 [H, W] at the original resolution). Labels are 0..149 and 255 (ignore)."""

    def __init__(self, root: str, split: str, img_size: int, train: bool, *, scale: Sequence[int],
                 ratio_range: Sequence[float], cat_max_ratio: float, mean: Sequence[float], std: Sequence[float],
                 ignore_index: int = IGNORE_INDEX):
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        check_ade20k(root)
        self.root, self.classes = root, list(CLASSES)
        self.size, self.train, self.scale, self.ratio_range = img_size, train, tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.ignore_index, self.normalize = cat_max_ratio, ignore_index, _Normalize(mean, std)
        self.image_dir = Path(root) / "images" / SPLITS[split]
        self.label_dir = Path(root) / "annotations" / SPLITS[split]
        images, labels = _stems(self.image_dir, ".jpg"), _stems(self.label_dir, ".png")
        for missing, have, lack in ((images - labels, self.image_dir, self.label_dir),
                                    (labels - images, self.label_dir, self.image_dir)):
            if missing:
                raise DataError(f"data.root: {len(missing)} files in {have} have no counterpart in {lack} "
                                f"(e.g. {min(missing)}); restore the missing files or remove the strays")
        self.stems = sorted(images)

    def __len__(self) -> int:
        return len(self.stems)

    def describe(self, index: int) -> str:
        return str(self.image_dir / f"{self.stems[index]}.jpg")

    def read_label(self, index: int) -> np.ndarray:
        """The reduced label map uint8 [H, W]."""
        with Image.open(self.label_dir / f"{self.stems[index]}.png") as png:
            label = np.array(png)
        if label.ndim != 2:
            raise ValueError(f"{self.stems[index]}.png is not a single-channel label map (mode {png.mode})")
        if label.size and label.max() > len(CLASSES):  # a class past the head: a device assert in the loss
            raise ValueError(f"{self.stems[index]}.png holds label {label.max()}, above ADE20K's {len(CLASSES)} classes")
        return reduce_zero_label(label)

    def load(self, index: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        with open_image(self.describe(index)) as img:
            img, _ = decode(img)
        label = self.read_label(index)
        if img.size != label.shape[::-1]:
            raise ValueError(f"{self.describe(index)} is {img.size[0]}x{img.size[1]} but its label "
                             f"{label.shape[1]}x{label.shape[0]}")
        if not self.train:
            img = img.resize(keep_ratio_size(*img.size, self.scale), Image.BILINEAR)
            return self.normalize(torch.from_numpy(np.array(img)).permute(2, 0, 1).float()), torch.from_numpy(
                label.astype(np.int64))

        r = rng.uniform(*self.ratio_range)
        size = keep_ratio_size(*img.size, (self.scale[0] * r, self.scale[1] * r))
        img = img.resize(size, Image.BILINEAR)
        label = np.array(Image.fromarray(label).resize(size, Image.NEAREST))
        top, left = self._crop(label, rng)
        pixels = np.array(img)[top:top + self.size, left:left + self.size]
        label = label[top:top + self.size, left:left + self.size]
        if rng.random() < 0.5:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        pixels = photometric_distortion(np.ascontiguousarray(pixels), rng)

        h, w = label.shape
        image = torch.zeros(3, self.size, self.size)
        image[:, :h, :w] = self.normalize(torch.from_numpy(pixels).permute(2, 0, 1).float())
        target = torch.full((self.size, self.size), self.ignore_index, dtype=torch.int64)
        target[:h, :w] = torch.from_numpy(label.astype(np.int64))
        return image, target

    def _crop(self, label: np.ndarray, rng: random.Random) -> tuple[int, int]:
        """(top, left) of mmseg's RandomCrop: up to 10 redraws while one class has >= cat_max_ratio of the
        crop's labelled pixels (or it has a single class); the last draw stands if none qualifies."""
        height, width = label.shape

        def draw() -> tuple[int, int]:
            return rng.randint(0, max(height - self.size, 0)), rng.randint(0, max(width - self.size, 0))

        top, left = draw()
        if self.cat_max_ratio < 1:
            for _ in range(10):
                crop = label[top:top + self.size, left:left + self.size]
                counts = np.bincount(crop.ravel(), minlength=256)
                counts[self.ignore_index] = 0
                counts = counts[counts > 0]
                if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                top, left = draw()
        return top, left


def photometric_distortion(pixels: np.ndarray, rng: random.Random, brightness: float = 32,
                           contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue: int = 18) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on uint8 RGB [H, W, 3]: each op with p = 0.5, contrast before or after
    the colour ops; every op rounds back to uint8, as there. Hue is in OpenCV's 0..180 units."""
    delta = rng.uniform(-brightness, brightness) if rng.random() < 0.5 else None
    contrast_first = rng.random() < 0.5
    alpha = rng.uniform(*contrast) if rng.random() < 0.5 else None
    sat = rng.uniform(*saturation) if rng.random() < 0.5 else None
    shift = rng.randint(-hue, hue) if rng.random() < 0.5 else None

    def affine(x: np.ndarray, a: float, b: float) -> np.ndarray:
        return np.clip(x.astype(np.float32) * a + b, 0, 255).astype(np.uint8)

    if delta is not None:
        pixels = affine(pixels, 1, delta)
    if contrast_first and alpha is not None:
        pixels = affine(pixels, alpha, 0)
    if sat is not None or shift is not None:
        hsv = np.array(Image.fromarray(pixels).convert("HSV"))  # PIL's hue is 0..255 for 360 degrees
        if sat is not None:
            hsv[..., 1] = affine(hsv[..., 1], sat, 0)
        if shift is not None:
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(shift * 256 / 180)) % 256
        pixels = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    if not contrast_first and alpha is not None:
        pixels = affine(pixels, alpha, 0)
    return pixels
