"""Train and eval image transforms: PIL decodes, torch resizes and jitters, all randomness from `rng`.

A transform takes an *opened but not yet decoded* PIL image and a `random.Random`, and returns a
normalised float tensor [3, S, S]. Every random draw happens before decoding and is made on the
original image size, so the augmentation does not depend on how the image is decoded:

* JPEGs whose crop is at least twice the output size are decoded at 1/2, 1/4 or 1/8 scale by the
  DCT (`Image.draft`), the largest reduction that still leaves the crop >= the output size. The
  crop box, sampled on the original size, is mapped onto the reduced image (rounded to its pixel
  grid: under half a reduced pixel, < 0.3% of such a crop's side).
* Geometry runs on uint8: PIL crops, torch's antialiased uint8 resize (PIL's filter, ~3x faster
  than `Image.resize` here) scales.
* The single uint8 -> float conversion happens on the small output; the colour jitter runs in
  float there with torchvision's float-tensor semantics (each op clamps to the valid range), then
  the normalisation, all in place. Jitter on uint8 (PIL ImageEnhance, or torchvision's uint8
  path, which converts to float and back per op) costs ~3x more.
"""
from __future__ import annotations

import math
import random
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vit.errors import DataError

_GRAY = torch.tensor([0.2989, 0.587, 0.114])  # torchvision's rgb_to_grayscale weights
_DRAFT_FACTORS = (8, 4, 2)


def open_image(fp) -> Image.Image:
    """Image.open, with an oversized image reported as ValueError so that the loader skips it."""
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ValueError(str(e)) from e


def sample_crop(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop, torchvision's RandomResizedCrop.get_params."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_factor(crop_w: int, crop_h: int, out_size: int) -> int:
    """The largest DCT reduction (1, 2, 4 or 8) that keeps a crop of this size >= out_size."""
    fit = min(crop_w, crop_h) // out_size
    return next((f for f in _DRAFT_FACTORS if f <= fit), 1)


def decode(img: Image.Image, draft_size: tuple[int, int] | None = None) -> tuple[Image.Image, float]:
    """Decode to RGB, DCT-reduced towards draft_size if a JPEG; also returns the reduction (1, 2, 4, 8)."""
    reduction = 1.0
    if draft_size is not None:
        width = img.size[0]
        drafted = img.draft("RGB", draft_size)  # None for non-JPEGs and already-decoded images
        if drafted is not None:
            reduction = width / drafted[1][2]  # drafted box = (0, 0, width / reduction, height / reduction)
    img.load()
    if img.mode.startswith("I") or img.mode == "F":
        img = _gray_to_8bit(img)
    return (img if img.mode == "RGB" else img.convert("RGB")), reduction


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grayscale (PNG, TIFF: modes I;16* and I) scaled to 8 bits. PIL's convert("RGB")
    would clamp every value above 255, turning such an image white without an error."""
    values = np.asarray(img)
    if img.mode == "F" or values.min() < 0 or values.max() > 65535:
        raise ValueError(f"unsupported {img.mode} image (not 8- or 16-bit unsigned)")
    return Image.fromarray((values >> 8).astype(np.uint8), "L")


def _rgbx(img: Image.Image) -> torch.Tensor:
    """uint8 [H, W, 4], the 4th channel padding. PIL stores RGB as 4 bytes a pixel and torch's fast
    uint8 resize works on 4 channels, so this saves a repacking pass on each side."""
    width, height = img.size
    return torch.frombuffer(bytearray(img.tobytes("raw", "RGBX")), dtype=torch.uint8).view(height, width, 4)


def _resize(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """uint8 [H, W, 4] -> uint8 [3, *size], antialiased like PIL."""
    return F.interpolate(pixels.permute(2, 0, 1).unsqueeze(0), size=size, mode=mode, antialias=True)[0, :3]


class _Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        # On the 0..255 scale: (x / 255 - mean) / std == x * scale - offset
        mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self.scale, self.offset = 1.0 / (255.0 * std), mean / std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.scale).sub_(self.offset)  # in place: 6x faster than a broadcast addcmul


class TrainTransform:
    """RandomResizedCrop + horizontal flip + ColorJitter(brightness, contrast, saturation) + normalise."""

    def __init__(self, img_size: int, scale: Sequence[float], ratio: Sequence[float], hflip: float,
                 jitter: Sequence[float], mean: Sequence[float], std: Sequence[float], interpolation: str):
        self.size, self.scale, self.ratio, self.hflip = img_size, tuple(scale), tuple(ratio), hflip
        self.jitter = [(op, max(0.0, 1 - j), 1 + j) for op, j in enumerate(jitter) if j > 0]
        self.normalize, self.interpolation = _Normalize(mean, std), interpolation

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        width, height = img.size
        top, left, h, w = sample_crop(width, height, self.scale, self.ratio, rng)
        flip = rng.random() < self.hflip
        ops = [(op, rng.uniform(lo, hi)) for op, lo, hi in self.jitter]
        rng.shuffle(ops)  # torchvision applies the jitter ops in a random order

        factor = draft_factor(w, h, self.size)
        img, r = decode(img, (width // factor, height // factor) if factor > 1 else None)
        box = (left, top, left + w, top + h)
        if r != 1:
            box = tuple(min(round(c / r), limit) for c, limit in zip(box, img.size * 2))
        x = _resize(_rgbx(img.crop(box)), (self.size, self.size), self.interpolation)  # PIL crops in C
        if flip:
            x = x.flip(-1)
        x = x.float()
        for op, f in ops:
            _jitter(x, op, f)
        return self.normalize(x)


def _jitter(x: torch.Tensor, op: int, f: float) -> None:
    """One ColorJitter op on a float CHW image in 0..255, in place, as torchvision does it on float
    tensors: blend with black (brightness), the gray mean (contrast) or the gray image (saturation)."""
    if op == 0:
        x.mul_(f)
    elif op == 1:
        x.lerp_(_GRAY @ x.mean((1, 2)), 1 - f)
    else:
        x.lerp_(torch.tensordot(_GRAY, x, 1), 1 - f)
    if f > 1:  # with f <= 1 the blend of in-range values stays in range
        x.clamp_(0, 255)


class EvalTransform:
    """Resize the shorter side to img_size / crop_pct, then centre-crop img_size, normalise."""

    def __init__(self, img_size: int, crop_pct: float, mean: Sequence[float], std: Sequence[float],
                 interpolation: str):
        self.size, self.resize_to = img_size, math.floor(img_size / crop_pct)
        self.normalize, self.interpolation = _Normalize(mean, std), interpolation
        self.crop_pct, self.mean, self.std = crop_pct, tuple(mean), tuple(std)  # for an export's pretrained_cfg

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        width, height = img.size
        short, long = sorted((width, height))
        long = int(self.resize_to * long / short)  # torchvision's Resize(int) rounding
        new_w, new_h = (self.resize_to, long) if width <= height else (long, self.resize_to)
        img, _ = decode(img, (new_w, new_h))
        x = _resize(_rgbx(img), (new_h, new_w), self.interpolation)
        top, left = int(round((new_h - self.size) / 2)), int(round((new_w - self.size) / 2))
        return self.normalize(x[:, top:top + self.size, left:left + self.size].float())


def build_transform(cfg: Mapping, train: bool):
    """Transform from data config keys img_size, scale, ratio, hflip (a probability), color_jitter
    (a number or [brightness, contrast, saturation]), mean, std, eval_crop_pct, interpolation
    ('bilinear' or 'bicubic'). Their values live in conf/ only."""
    common = dict(mean=tuple(setting(cfg, "mean")), std=tuple(setting(cfg, "std")),
                  interpolation=setting(cfg, "interpolation"))
    if common["interpolation"] not in ("bilinear", "bicubic"):
        raise DataError(f"data.interpolation: {common['interpolation']!r} is not 'bilinear' or 'bicubic'")
    if not train:
        return EvalTransform(setting(cfg, "img_size"), setting(cfg, "eval_crop_pct"), **common)
    jitter = setting(cfg, "color_jitter")
    jitter = (float(jitter),) * 3 if isinstance(jitter, (int, float)) else tuple(jitter)
    if len(jitter) != 3:
        raise DataError(f"data.color_jitter: expected a number or [brightness, contrast, saturation], got {jitter}")
    return TrainTransform(setting(cfg, "img_size"), setting(cfg, "scale"), setting(cfg, "ratio"),
                          float(setting(cfg, "hflip")), jitter, **common)


def setting(data_cfg: Mapping, key: str):
    """A data config key that conf/ sets for every dataset: a config without it is one clear line."""
    if key not in data_cfg:
        raise DataError(f"data.{key} is missing; add it to the data config (conf/data/ and conf/pretrain.yaml "
                        "set every key)")
    return data_cfg[key]
