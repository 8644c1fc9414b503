"""The image source named by the `data` config, and a cheap check of that config before submitting.

    format: auto | imagefolder | shards | synset_tars | synthetic | coco | ade20k   (required)
    synthetic:  num_samples, num_classes, img_size, seed, val_samples; data.root must be unset
    coco:       root (with train2017/, val2017/, annotations/), img_size (canvas side), scale_range
                (large-scale jitter), masks (instance masks as training targets), mean, std;
                see vit/data/coco.py
    ade20k:     root (the ADEChallengeData2016 directory), img_size (crop side), resize (short and
                long side at ratio 1), ratio_range, cat_max_ratio, mean, std; see vit/data/ade20k.py
    real data:  root           the train data, read in place (auto: whichever of these it holds, said
                               in the first log line; see vit/data/layout.py):
                                 imagefolder  root/<synset>/<image> (ImageNet-21K-P's imagenet21k_train)
                                 shards       WebDataset .tar shards: ours, or timm's ImageNet-21K ones
                                 synset_tars  fall11_whole.tar / winter21_whole.tar, or its <wnid>.tar files
                val_root       optional val data, labelled by root's classes
                               (e.g. ImageNet-21K-P's imagenet21k_val, or the ImageNet-1k val tree)
                val_per_class  without a val split in the data or val_root: hold out this many samples
                               of each class (at most half of a class), as ImageNet-21K-P holds out 50
                val_fraction   or this fraction of the samples (set at most one of the two; 0/null: none)
                num_classes    optional; must match the classes found
                img_size, scale, ratio, hflip, color_jitter, mean, std, eval_crop_pct,
                interpolation  see vit/data/transforms.py

The val split, first that applies: data.val_root; the data's own validation shards (timm's _info.json
or `-validation-` names), whose train shards are then the train split; the hold-out. The hold-out is
chosen by a hash of each sample's key (relative path; tars: tar name and member), so it is the same on
every run, world size and machine, and adding images never moves others between splits. It is never
trained on: the train split is what it leaves.
"""
from __future__ import annotations

import os
import random
import zlib
from typing import Iterable, Mapping

import numpy as np
import torch

from vit.data.ade20k import ADE20K, check_ade20k
from vit.data.coco import CocoDetection, check_coco
from vit.data.imagefolder import ImageFolder, check_classes, list_class_dirs
from vit.data.layout import datasets_below, detect, parent_error
from vit.data.loader import Source
from vit.data.shards import Shards, list_shards, read_classes
from vit.data.synset_tars import SynsetTars, gzip_error, is_gzipped, list_synset_tars
from vit.data.synthetic import SyntheticImages
from vit.data.transforms import build_transform, setting
from vit.errors import DataError

__all__ = ["Subset", "build_source", "check_data", "holdout_mask"]

READERS = {"imagefolder": ImageFolder, "shards": Shards, "synset_tars": SynsetTars}
FORMATS = ("auto", "synthetic", *READERS, "coco", "ade20k")


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


def key_hashes(keys: Iterable[bytes], count: int) -> np.ndarray:
    """A well-mixed 32-bit hash of each key."""
    h = np.fromiter(map(zlib.crc32, keys), dtype=np.uint64, count=count)
    # crc32 is linear, so similar paths get related values: mix with murmur3's finaliser
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x85EBCA6B)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(13)
    h = (h * np.uint64(0xC2B2AE35)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(16)
    return h


def holdout_mask(hashes: np.ndarray, fraction: float) -> np.ndarray:
    """True where the hash falls below `fraction` of the hash range."""
    return hashes < np.uint64(round(fraction * 2**32))


def per_class_holdout(hashes: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """True for the `per_class` lowest hashes of each class, at most half of the class, so that every
    class keeps training samples (fall11 has synsets of a single image)."""
    order = np.lexsort((hashes, labels))  # by class, then hash
    sorted_labels = labels[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    take = np.minimum(per_class, np.bincount(labels) // 2)[sorted_labels]
    mask = np.zeros(len(order), dtype=bool)
    mask[order[rank < take]] = True
    return mask


def build_source(data_cfg: Mapping, split: str, cache_dir: str | None = None) -> Source:
    """The train or val source. `cache_dir` (e.g. the run dir) holds file indexes of read-only datasets."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    fmt = _format(data_cfg)
    if fmt == "synthetic":
        num_classes, img_size, seed = data_cfg["num_classes"], data_cfg["img_size"], setting(data_cfg, "seed")
        if split == "train":
            return SyntheticImages(data_cfg["num_samples"], num_classes, img_size, seed)
        return SyntheticImages(setting(data_cfg, "val_samples"), num_classes, img_size, seed,
                               first_index=data_cfg["num_samples"])
    if fmt in ("coco", "ade20k"):
        return _dense_source(fmt, data_cfg, split)

    root, val_root = _require(data_cfg, "root"), data_cfg.get("val_root")
    transform = build_transform(data_cfg, train=split == "train")
    source = _open(fmt, "data.root", root, transform, cache_dir)
    _check_num_classes(data_cfg, len(source.classes), root)
    if split == "val" and val_root:
        return _nonempty(_open(fmt, "data.val_root", val_root, transform, cache_dir, source.classes),
                         "data.val_root", val_root, "give it images")
    splits = getattr(source, "splits", None) or {}
    train = splits["train"] if "train" in splits else np.setdiff1d(np.arange(len(source)), splits.get("val", []))
    if not len(train):
        raise DataError(f"data.root: {root} has validation shards only; point it at the folder with the train shards")
    if val_root or "val" in splits:
        if split == "val":
            return _nonempty(Subset(source, splits["val"]), "data.root", f"the validation shards of {root}",
                             "give them samples")
        return Subset(source, train) if splits else source
    held_out = _held_out(data_cfg, source, train)
    if split == "val" and held_out is None:
        raise DataError(f"data.val_per_class: {root} has no val split, and data.val_root, data.val_per_class and "
                        "data.val_fraction are unset; set one (e.g. data.val_per_class=50), or train.eval_every=0")
    if held_out is None:
        return Subset(source, train) if splits else source
    if split == "train":
        return Subset(source, train[~held_out])
    if data_cfg.get("val_fraction"):
        return _nonempty(Subset(source, train[held_out]), "data.val_fraction", f"the hold-out of {root}", "raise it")
    return _nonempty(Subset(source, train[held_out]), "data.val_per_class", f"the hold-out of {root}",
                     "it takes at most half of a class, so classes of one image give none; set data.val_root")


def _held_out(data_cfg: Mapping, source, candidates: np.ndarray) -> np.ndarray | None:
    """Which of the samples `candidates` are held out for validation; None if no hold-out is set."""
    per_class, fraction = _val_per_class(data_cfg), _val_fraction(data_cfg)
    if not (per_class or fraction):
        return None
    hashes = key_hashes(source.sample_keys(), len(source))[candidates]
    if fraction:
        return holdout_mask(hashes, fraction)
    return per_class_holdout(hashes, source.sample_labels()[candidates], per_class)


def _nonempty(source, key: str, what: str, fix: str):
    """An empty val split would evaluate to NaN: an error before training instead."""
    if not len(source):
        raise DataError(f"{key}: {what} holds no samples, so the val split is empty; {fix}, "
                        "or set train.eval_every=0")
    return source


def expected_train_samples(data_cfg: Mapping) -> int:
    """`data.num_samples` less the share held out of data.root for validation: what the run will
    index, for plans and submit-time checks made without reading the dataset."""
    count = int(_require(data_cfg, "num_samples"))
    if _format(data_cfg) in ("synthetic", "coco", "ade20k") or data_cfg.get("val_root"):
        return count
    per_class = _val_per_class(data_cfg)
    if per_class and data_cfg.get("num_classes"):  # at most half of a class is held out
        return max(count - per_class * int(data_cfg["num_classes"]), count // 2)
    return round(count * (1 - _val_fraction(data_cfg)))


def check_data(data_cfg: Mapping) -> str:
    """Fast sanity check for the login node: paths, layout, class count. Reads each class directory
    only up to its first image, never the full listing. Returns what it found, for the first log line."""
    fmt = _format(data_cfg)
    if fmt == "synthetic":
        if data_cfg.get("root"):  # e.g. experiment=smoke data.root=...: it would train on generated images
            raise DataError(f"data.root: {data_cfg['root']} is set, but data.format=synthetic trains on generated "
                            "images; set data.format=auto to train on it, or data.root=null")
        for key in ("num_samples", "num_classes", "img_size"):
            _require(data_cfg, key)
        return f"data: synthetic images, {data_cfg['num_classes']} classes"
    _require(data_cfg, "img_size")
    if fmt in ("coco", "ade20k"):
        dense_options(fmt, data_cfg)
        (check_coco if fmt == "coco" else check_ade20k)(_require(data_cfg, "root"))
        return f"data: {fmt} at {data_cfg['root']}"
    build_transform(data_cfg, train=True)
    root = _require(data_cfg, "root")
    fmt, found = _resolve(fmt, "data.root", root)
    classes = _check_tree(fmt, "data.root", root)
    if classes is not None:
        _check_num_classes(data_cfg, len(classes), root)
    if _val_fraction(data_cfg) and _val_per_class(data_cfg):
        raise DataError("data.val_per_class: is set together with data.val_fraction; set one of them to null")
    val_root = data_cfg.get("val_root")
    if val_root:
        val_classes = _check_tree(_resolve(data_cfg["format"], "data.val_root", val_root)[0], "data.val_root", val_root)
        missing = sorted(set(val_classes or []) - set(classes or val_classes or []))
        if missing:
            raise DataError(f"data.val_root: {val_root} has {len(missing)} classes that data.root lacks "
                            f"(e.g. {missing[0]}); use val data of the same classes")
    return f"data: {found}" + (f"; val: {val_root}" if val_root else "")


def _dense_source(fmt: str, data_cfg: Mapping, split: str):
    """COCO or ADE20K: their own splits (train2017/val2017, training/validation), train-time
    augmentation on the train split only."""
    root, img_size = _require(data_cfg, "root"), int(_require(data_cfg, "img_size"))
    cls = CocoDetection if fmt == "coco" else ADE20K
    return cls(root, split, img_size, train=split == "train", **dense_options(fmt, data_cfg))


def dense_options(fmt: str, data_cfg: Mapping) -> dict:
    """The COCO or ADE20K source's keyword arguments, from the data config."""
    options = {"mean": tuple(setting(data_cfg, "mean")), "std": tuple(setting(data_cfg, "std"))}
    if fmt == "coco":
        options["scale_range"] = _range(data_cfg, "scale_range")
        options["masks"] = bool(setting(data_cfg, "masks"))
        return options
    options["ratio_range"] = _range(data_cfg, "ratio_range")
    options["scale"] = tuple(int(v) for v in _range(data_cfg, "resize"))  # order-free, as mmcv's
    options["cat_max_ratio"] = float(setting(data_cfg, "cat_max_ratio"))
    if not 0 < options["cat_max_ratio"] <= 1:
        raise DataError(f"data.cat_max_ratio: {options['cat_max_ratio']} is outside (0, 1]; 1 disables it")
    return options


def _range(data_cfg: Mapping, key: str) -> tuple[float, float]:
    value = setting(data_cfg, key)
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


def _val_per_class(data_cfg: Mapping) -> int:
    count = data_cfg.get("val_per_class") or 0
    if type(count) is not int or count < 0:
        raise DataError(f"data.val_per_class: must be a whole number >= 0, got {count!r}")
    return count


def _check_num_classes(data_cfg: Mapping, found: int, root: str) -> None:
    expected = data_cfg.get("num_classes")
    if expected is not None and int(expected) != found:
        raise DataError(f"data.num_classes: is {expected} but {root} has {found} classes; "
                        f"set data.num_classes={found} or point data.root at the intended dataset")


def _resolve(fmt: str, key: str, path: str) -> tuple[str, str]:
    """The reader's format for `path` (auto: detected) and what the path holds."""
    try:
        if fmt == "auto":
            fmt, found = detect(path)
            return fmt, f"data.format=auto: {found}"
        return fmt, f"{fmt} at {path}"
    except DataError as e:
        raise DataError(f"{key}: {e}") from None


def _open(fmt: str, key: str, path: str, transform, cache_dir: str | None, classes: list[str] | None = None):
    fmt = _resolve(fmt, key, path)[0]
    try:
        return READERS[fmt](path, transform, cache_dir, classes)
    except DataError as e:
        raise _located(key, path, e) from None


def _check_tree(fmt: str, key: str, path: str) -> list[str] | None:
    """The classes of a dataset after checking its layout (one directory listing per class at most),
    or None where only the full index would tell (timm's shards, an outer release tar)."""
    try:
        if fmt == "shards":
            list_shards(path)
            return read_classes(path)
        if fmt == "synset_tars" and os.path.isfile(path):
            if is_gzipped(path):
                raise gzip_error(path)
            return None
        if fmt == "synset_tars":
            return [t[:-4] for t in list_synset_tars(path)]
        classes = list_class_dirs(path)
        check_classes(path, classes)
        return classes
    except DataError as e:
        raise _located(key, path, e) from None


def _located(key: str, path: str, error: DataError) -> DataError:
    """`error` under `key`, or, if the datasets sit one level below `path`, which one to use."""
    below = datasets_below(path) if os.path.isdir(path) else []
    return DataError(f"{key}: {parent_error(path, below) if below else error}")
