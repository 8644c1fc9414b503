"""What a `data.root` holds, from one directory listing: the layout that `data.format: auto` trains
on, described for the first log line, or a one-line error that names the directory to use instead
(a gzipped release, or a folder that holds datasets one level down, like ImageNet-21K-P's
imagenet21k_resized/ with imagenet21k_train/, imagenet21k_val/ and imagenet21k_small_classes/)."""
from __future__ import annotations

import os
import re

from vit.data.imagefolder import is_image
from vit.data.shards import list_shards, shard_splits
from vit.data.synset_tars import gzip_error, is_gzipped
from vit.errors import DataError

WNID_TAR = re.compile(r"^n\d{8}\.tar$")
GZIPPED = (".tar.gz", ".tgz")
MAX_CHILDREN = 16  # a parent folder holds a few datasets; a class folder holds thousands of classes


def detect(root: str) -> tuple[str, str]:
    """(format, what was found) of `root`."""
    found = _layout(root)
    if found:
        return found
    below = datasets_below(root)
    if below:
        raise parent_error(root, below)
    raise DataError(f"{root} holds no dataset this recognises: an ImageFolder tree (root/<class>/<image>), "
                    "per-synset tars (<wnid>.tar, or the outer release .tar), or WebDataset .tar shards")


def datasets_below(root: str) -> list[tuple[str, str]]:
    """(child directory, format) of the datasets directly below `root`."""
    try:
        with os.scandir(root) as entries:
            children = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []
    found = []
    for child in children[:MAX_CHILDREN]:
        try:
            layout = _layout(os.path.join(root, child))
        except DataError:  # e.g. a gzipped tar there: not a dataset to point at
            layout = None
        if layout:
            found.append((child, layout[0]))
    return found


def parent_error(root: str, below: list[tuple[str, str]]) -> DataError:
    names = [child for child, _ in below]
    train = next((c for c in names if "train" in c), names[0])
    val = next((c for c in names if "val" in c and c != train), None)
    fix = f"data.root={os.path.join(root, train)}" + (f" and data.val_root={os.path.join(root, val)}" if val else "")
    return DataError(f"{root} holds datasets one level down, not classes: "
                     f"{', '.join(f'{c}/ ({fmt})' for c, fmt in below)}; set {fix}")


def _layout(root: str) -> tuple[str, str] | None:
    if os.path.isfile(root):
        if root.endswith(GZIPPED) or is_gzipped(root):
            raise gzip_error(root)
        if root.endswith(".tar"):
            return "synset_tars", f"{root} is an outer tar of per-synset tars (the fall11/winter21 release)"
        raise DataError(f"{root} is a file, not a dataset directory or an outer release .tar")
    if not os.path.isdir(root):
        raise DataError(f"{root} does not exist or is not a directory")
    with os.scandir(root) as entries:
        visible = [e for e in entries if not e.name.startswith(".")]
    tars = sorted(e.name for e in visible if e.name.endswith(".tar") and e.is_file())
    if tars and all(WNID_TAR.match(t) for t in tars):
        return "synset_tars", f"{root} is a folder of {len(tars)} per-synset tars (<wnid>.tar)"
    if tars:
        splits = shard_splits(root, list_shards(root))
        split_text = (f", {' and '.join(f'{len(v)} {k}' for k, v in sorted(splits.items()))} shards"
                      if splits else " of one split")
        return "shards", f"{root} is a folder of {len(tars)} WebDataset shards{split_text}"
    gzipped = [e.name for e in visible if e.name.endswith(GZIPPED)]
    if gzipped:
        raise gzip_error(os.path.join(root, sorted(gzipped)[0]))
    dirs = sorted(e.name for e in visible if e.is_dir())
    if any(_holds_images(os.path.join(root, d)) for d in dirs[:MAX_CHILDREN]):
        return "imagefolder", f"{root} is an ImageFolder tree of {len(dirs)} class directories"
    return None


def _holds_images(path: str) -> bool:
    with os.scandir(path) as entries:
        return any(is_image(e.name) for e in entries)
