"""The image source named by the `data` config, and a cheap check of that config before submitting.

    format: synthetic | imagefolder | shards | coco | ade20k   (required)
    synthetic:  num_samples, num_classes, img_size, seed (0), val_samples (256)
    coco:       root (with train2017/, val2017/, annotations/), img_size (canvas side),
                scale_range (large-scale jitter, [0.1, 2.0]), masks (instance masks as training
                targets), mean, std; see vit/data/coco.py
    ade20k:     root (the ADEChallengeData2016 directory), img_size (crop side),
                resize ([512, 2048]: short and long side at ratio 1), ratio_range ([0.5, 2.0]),
                cat_max_ratio (0.75), mean, std; see vit/data/ade20k.py
    real data:  root           train ImageFolder tree or shard directory
                val_root       optional val data in the same format, labelled by root's classes
                               (e.g. the ImageNet-1k val tree for ImageNet-21k training)
                val_fraction   without val_root: this fraction of root is held out for val
                               and excluded from train (default 0: no val split)
                num_classes    optional; must match the classes found
                img_size, scale, ratio, hflip, color_jitter, mean, std, eval_crop_pct,
                interpolation  see vit/data/transforms.py

The hold-out is chosen by a hash of each sample's relative path (shards: shard name and key),
so it is the same on every run and machine, and adding images never moves others between splits.
"""
from __future__ import annotations

import random
import zlib
from typing import Iterable, Mapping

import numpy as np
import torch

from vit.data.ade20k import ADE20K, check_ade20k
from vit.data.coco import CocoDetection, check_coco
from vit.data.imagefolder import DataError, ImageFolder, check_classes, list_class_dirs
from vit.data.loader import Source
from vit.data.shards import Shards, list_shards, read_classes
from vit.data.synthetic import SyntheticImages
from vit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform

__all__ = ["DataError", "Subset", "build_source", "check_data", "holdout_mask"]

FORMATS = ("synthetic", "imagefolder", "shards", "coco", "ade20k")


class Subset:
    """The samples `indices` of a source, renumbered 0..len-1."""

    def __init__(self, source: Source, indices: np.ndarray):
        self.source, self.indices, self.classes = source, indices, source.classes

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, index: int) -> str:
        return self.source.describe(int(self.indices[index]))

    def load(self, index: int, rng: random.Random) -> tuple[torch.Tensor, int]:
        return self.source.load(int(self.indices[index]), rng)


def holdout_mask(keys: Iterable[bytes], count: int, fraction: float) -> np.ndarray:
    """True where the key's hash falls below `fraction` of the hash range."""
    h = np.fromiter(map(zlib.crc32, keys), dtype=np.uint64, count=count)
    # crc32 is linear, so similar paths get related values: mix with murmur3's finaliser
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    return h < np.uint64(round(fraction * 2**32))


def build_source(data_cfg: Mapping, split: str, cache_dir: str | None = None) -> Source:
    """The train or val source. `cache_dir` (e.g. the run dir) holds file indexes of read-only datasets."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    fmt = _format(data_cfg)
    if fmt == "synthetic":
        num_classes, img_size, seed = data_cfg["num_classes"], data_cfg["img_size"], data_cfg.get("seed", 0)
        if split == "train":
            return SyntheticImages(data_cfg["num_samples"], num_classes, img_size, seed)
        return SyntheticImages(data_cfg.get("val_samples", 256), num_classes, img_size, seed,
                               first_index=data_cfg["num_samples"])
    if fmt in ("coco", "ade20k"):
        return _dense_source(fmt, data_cfg, split)

    root, val_root, fraction = _require(data_cfg, "root"), data_cfg.get("val_root"), _val_fraction(data_cfg)
    transform = build_transform(data_cfg, train=split == "train")
    if split == "val" and val_root:
        return _open(fmt, "data.val_root", val_root, transform, cache_dir, _classes(fmt, "data.root", root))
    if split == "val" and not fraction:
        raise DataError("data.val_root and data.val_fraction are both unset, so there is no val split; set one")
    source = _open(fmt, "data.root", root, transform, cache_dir)
    _check_num_classes(data_cfg, len(source.classes), root)
    if val_root or not fraction:
        return source
    held_out = holdout_mask(source.sample_keys(), len(source), fraction)
    return Subset(source, np.flatnonzero(held_out if split == "val" else ~held_out))


def expected_train_samples(data_cfg: Mapping) -> int:
    """`data.num_samples` less the share held out of data.root for validation: what the run will
    index, for plans and submit-time checks made without reading the dataset."""
    count = int(_require(data_cfg, "num_samples"))
    if _format(data_cfg) in ("synthetic", "coco", "ade20k") or data_cfg.get("val_root"):
        return count
    return round(count * (1 - _val_fraction(data_cfg)))


def check_data(data_cfg: Mapping) -> None:
    """Fast sanity check for the login node: paths, layout, class count. Reads each class directory
    only up to its first image, never the full listing."""
    fmt = _format(data_cfg)
    if fmt == "synthetic":
        for key in ("num_samples", "num_classes", "img_size"):
            _require(data_cfg, key)
        return
    _require(data_cfg, "img_size")
    if fmt in ("coco", "ade20k"):
        _dense_options(fmt, data_cfg)
        (check_coco if fmt == "coco" else check_ade20k)(_require(data_cfg, "root"))
        return
    try:
        build_transform(data_cfg, train=True)
    except ValueError as e:  # its messages name the key
        raise DataError(str(e)) from None
    root = _require(data_cfg, "root")
    classes = _check_tree(fmt, "data.root", root)
    _check_num_classes(data_cfg, len(classes), root)
    _val_fraction(data_cfg)
    val_root = data_cfg.get("val_root")
    if val_root:
        missing = sorted(set(_check_tree(fmt, "data.val_root", val_root)) - set(classes))
        if missing:
            raise DataError(f"data.val_root: {val_root} has {len(missing)} classes that data.root lacks "
                            f"(e.g. {missing[0]}); use val data of the same classes")


def _dense_source(fmt: str, data_cfg: Mapping, split: str):
    """COCO or ADE20K: their own splits (train2017/val2017, training/validation), train-time
    augmentation on the train split only."""
    root, img_size = _require(data_cfg, "root"), int(_require(data_cfg, "img_size"))
    cls = CocoDetection if fmt == "coco" else ADE20K
    return cls(root, split, img_size, train=split == "train", **_dense_options(fmt, data_cfg))


def _dense_options(fmt: str, data_cfg: Mapping) -> dict:
    options = {"mean": tuple(data_cfg.get("mean", IMAGENET_MEAN)), "std": tuple(data_cfg.get("std", IMAGENET_STD))}
    if fmt == "coco":
        options["scale_range"] = _range(data_cfg, "scale_range", (0.1, 2.0))
        options["masks"] = bool(data_cfg.get("masks", False))
        return options
    options["ratio_range"] = _range(data_cfg, "ratio_range", (0.5, 2.0))
    options["scale"] = tuple(int(v) for v in _range(data_cfg, "resize", (512, 2048)))  # order-free, as mmcv's
    options["cat_max_ratio"] = float(data_cfg.get("cat_max_ratio", 0.75))
    if not 0 < options["cat_max_ratio"] <= 1:
        raise DataError(f"data.cat_max_ratio: {options['cat_max_ratio']} is outside (0, 1]; 1 disables it")
    return options


def _range(data_cfg: Mapping, key: str, default: tuple[float, float]) -> tuple[float, float]:
    value = data_cfg.get(key, default)
    try:
        lo, hi = map(float, value)
    except (TypeError, ValueError):
        raise DataError(f"data.{key}: expected [low, high], got {value!r}") from None
    if not 0 < lo <= hi:
        raise DataError(f"data.{key}: [{lo}, {hi}] needs 0 < low <= high")
    return lo, hi


def _format(data_cfg: Mapping) -> str:
    fmt = _require(data_cfg, "format")
    if fmt not in FORMATS:
        raise DataError(f"data.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def _require(data_cfg: Mapping, key: str):
    value = data_cfg.get(key)
    if value is None or value == "":
        raise DataError(f"data.{key} is not set; add it to the data config")
    return value


def _val_fraction(data_cfg: Mapping) -> float:
    fraction = float(data_cfg.get("val_fraction") or 0.0)
    if not 0 <= fraction < 1:
        raise DataError(f"data.val_fraction: {fraction} is outside [0, 1)")
    return fraction


def _check_num_classes(data_cfg: Mapping, found: int, root: str) -> None:
    expected = data_cfg.get("num_classes")
    if expected is not None and int(expected) != found:
        raise DataError(f"data.num_classes: is {expected} but {root} has {found} classes; "
                        f"set data.num_classes: {found} or point data.root at the intended dataset")


def _open(fmt: str, key: str, path: str, transform, cache_dir: str | None, classes: list[str] | None = None):
    try:
        return (ImageFolder if fmt == "imagefolder" else Shards)(path, transform, cache_dir, classes)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None


def _classes(fmt: str, key: str, path: str) -> list[str]:
    try:
        return list_class_dirs(path) if fmt == "imagefolder" else read_classes(path)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None


def _check_tree(fmt: str, key: str, path: str) -> list[str]:
    """The classes of a dataset, after checking its layout: one directory listing per class at most."""
    try:
        if fmt == "shards":
            list_shards(path)
            return read_classes(path)
        classes = list_class_dirs(path)
        check_classes(path, classes)
        return classes
    except DataError as e:
        raise DataError(f"{key}: {e}") from None
