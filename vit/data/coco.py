"""COCO object detection (the instances JSON) as a Source, with ViTDet's large-scale jitter.

Layout: <root>/{train2017,val2017}/*.jpg and <root>/annotations/instances_{train,val}2017.json.
Labels are 1..K in category-id order, 0 being background as in torchvision's detectors;
`cat_ids[label - 1]` is the COCO category id that evaluation needs (COCO's ids have gaps).

Every sample is an S x S canvas: the image at the top left, zero padding (after normalisation)
at the bottom and right, so that a batch stacks. `target["scale"]` is canvas pixels per original
pixel: eval boxes divided by it are in the JSON's coordinates again, and `target["size"]` (the
original width and height) bounds them. `target["image_size"]` is the (height, width) of the image's
content on the canvas: the detector clips proposals and detections to it, never to the padding.

With `masks`, a training target also has "masks" [N, h, w] (uint8, the image's content on the
canvas): each instance's polygons or RLE decoded at the original size and resized and cropped as
the image is (nearest neighbour), so one path serves every COCO segmentation format.

The resize samples only the part of the image that stays on the canvas (PIL's `box`), and JPEGs
are DCT-reduced first when the resize more than halves them: at LSJ's r = 2 most of the upscaled
image is cropped away, at r = 0.1 most of the decoded pixels would be averaged away.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from vit.data.transforms import _Normalize, decode, open_image
from vit.errors import DataError

SPLITS = {"train": "train2017", "val": "val2017"}
_JSON_KEYS = ("images", "annotations", "categories")
_KEY = re.compile(rb'"(images|annotations|categories)"\s*:')


def _split_dir(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    return SPLITS[split]


def ann_path(root: str, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{_split_dir(split)}.json"


def check_coco(root: str, splits: Sequence[str] = ("train", "val")) -> None:
    """DataError naming data.root for a wrong layout. Scans the JSONs for their keys, lists no images."""
    for split in splits:
        ann_file = _check_layout(root, split)
        _check_keys(ann_file, _scan_keys(ann_file))


def _check_layout(root: str, split: str) -> Path:
    if not os.path.isdir(root):
        raise DataError(f"data.root: {root} does not exist or is not a directory; point data.root at the COCO root")
    image_dir, ann_file = Path(root) / _split_dir(split), ann_path(root, split)
    if not image_dir.is_dir():
        raise DataError(f"data.root: {root} has no {image_dir.name}/ image directory; point data.root at the COCO root")
    if not ann_file.is_file():
        raise DataError(f"data.root: {root} has no annotations/{ann_file.name}; point data.root at the COCO root")
    return ann_file


def _scan_keys(ann_file: Path) -> set[str]:
    """The COCO keys quoted in the file: parsing instances_train2017.json (448 MB) takes GBs and
    seconds, which a login-node check should not spend."""
    found, tail = set(), b""
    with open(ann_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            found.update(m.group(1).decode() for m in _KEY.finditer(tail + chunk))
            if len(found) == len(_JSON_KEYS):
                break
            tail = chunk[-64:]
    return found


def _check_keys(ann_file: Path, keys) -> None:
    missing = [k for k in _JSON_KEYS if k not in keys]
    if missing:
        raise DataError(f"data.root: {ann_file} has no {missing[0]!r} list; use COCO's instances_*.json files")


def _read_json(ann_file: Path) -> dict:
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"data.root: {ann_file} is not readable JSON ({e}); re-download the COCO annotations") from None
    _check_keys(ann_file, data if isinstance(data, dict) else {})
    return data


def segmentation_mask(segmentation, height: int, width: int) -> np.ndarray:
    """A COCO segmentation as an [height, width] uint8 mask: polygons (a list of x, y lists), the
    uncompressed RLE of crowd regions ({"counts": [run lengths], "size": [h, w]}) or compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, *segmentation["size"])
    else:
        rle = segmentation
    return mask_utils.decode(rle)


class CocoDetection:
    """Map-style detection source: (image [3, S, S], {"boxes", "labels", "image_id", "scale", "size",
    "image_size"}).

    Crowd regions are never targets. Training samples only images with a non-crowd box (as ViTDet
    does: an empty image teaches nothing but background); eval keeps every image.
    """

    def __init__(self, root: str, split: str, img_size: int, train: bool, *, scale_range: Sequence[float],
                 mean: Sequence[float], std: Sequence[float], masks: bool, hflip: bool = True):
        self.root, self.image_dir, self.ann_file = root, Path(root) / _split_dir(split), _check_layout(root, split)
        self.size, self.train, self.scale_range, self.hflip = img_size, train, tuple(scale_range), hflip
        self.masks = masks and train  # evaluation scores masks against the JSON itself
        self.normalize = _Normalize(mean, std)
        data = _read_json(self.ann_file)

        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.classes = [c["name"] for c in categories]
        self.cat_ids = [c["id"] for c in categories]
        label_of = {cat_id: label for label, cat_id in enumerate(self.cat_ids, start=1)}
        boxes, labels, self.segmentations = defaultdict(list), defaultdict(list), defaultdict(list)
        for a in data["annotations"]:
            if not a.get("iscrowd", 0):
                x, y, w, h = a["bbox"]
                boxes[a["image_id"]].append((x, y, x + w, y + h))
                labels[a["image_id"]].append(label_of[a["category_id"]])
                if self.masks:
                    self.segmentations[a["image_id"]].append(a["segmentation"])
        self.files = {im["id"]: im["file_name"] for im in data["images"]}
        self.image_ids = sorted(i for i in self.files if boxes[i] or not train)
        self.boxes = {i: np.array(boxes[i], dtype=np.float64).reshape(-1, 4) for i in self.image_ids}
        self.labels = {i: np.array(labels[i], dtype=np.int64) for i in self.image_ids}

    def __len__(self) -> int:
        return len(self.image_ids)

    def describe(self, index: int) -> str:
        return str(self.image_dir / self.files[self.image_ids[index]])

    def load(self, index: int, rng: random.Random) -> tuple[torch.Tensor, dict]:
        image_id, size = self.image_ids[index], self.size
        with open_image(self.describe(index)) as img:
            width, height = img.size
            r = rng.uniform(*self.scale_range) if self.train else 1.0
            scale = r * size / max(width, height)
            flip = self.train and self.hflip and rng.random() < 0.5
            new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
            left = rng.randint(0, new_w - size) if new_w > size else 0  # only LSJ makes it larger
            top = rng.randint(0, new_h - size) if new_h > size else 0
            w, h = min(size, new_w - left), min(size, new_h - top)

            img, reduction = decode(img, (math.ceil(width * scale), math.ceil(height * scale)))
            to_src = 1 / (scale * reduction)  # canvas pixels -> pixels of the decoded image
            box = (left * to_src, top * to_src, min((left + w) * to_src, img.size[0]),
                   min((top + h) * to_src, img.size[1]))
            img = img.resize((w, h), Image.BILINEAR, box=box)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        if flip:
            x = x.flip(-1)
        image = torch.zeros(3, size, size)
        image[:, :h, :w] = self.normalize(x.float())

        boxes = self.boxes[image_id] * scale - (left, top, left, top)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        labels = self.labels[image_id]
        keep = np.ones(len(labels), dtype=bool)
        if self.train:
            keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
            boxes, labels = boxes[keep], labels[keep]
        if flip:
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                  "image_id": int(image_id), "scale": float(scale), "size": (width, height), "image_size": (h, w)}
        if self.masks:
            # The canvas region (left, top, w, h) in original pixels, as the image was resized.
            region = (left / scale, top / scale, min((left + w) / scale, width), min((top + h) / scale, height))
            masks = [np.array(Image.fromarray(segmentation_mask(segm, height, width)).resize((w, h), Image.NEAREST,
                                                                                           box=region))
                     for segm, k in zip(self.segmentations[image_id], keep) if k]
            masks = torch.from_numpy(np.stack(masks) if masks else np.zeros((0, h, w), dtype=np.uint8))
            target["masks"] = masks.flip(-1) if flip else masks
        return image, target
