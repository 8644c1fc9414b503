"""ImageFolder trees (root/<synset>/<image>.jpg|jpeg|png|webp) as a map-style source with a cached file index.

Listing 14M files takes minutes on a parallel file system, so the index is built once, with one
thread per class directory in flight (os.scandir releases the GIL while the metadata server
answers), and saved as a compressed .npz: class names, per-class file offsets and all file names
in one uint8 blob. Held as a few numpy arrays instead of 14M Python strings, it is small and its
pages stay shared between forked DataLoader workers (Python objects would be copied on first
touch, when their reference counts change).

The cache is `<root>/.imagefolder-index.npz` if the root is writable, else
`<cache_dir>/imagefolder-index-<hash of root path>.npz` (the run dir; said on stderr). It is trusted while its fingerprint
matches: the class directory names and each one's mtime. A directory's mtime changes whenever an
entry in it is created, deleted or renamed, so this catches added/removed images and classes with
one stat per class (not one per file, which would cost as much as a rebuild). Rewriting an
image's contents in place is not detected, and need not be: the index only holds names.
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch

from vit.data.transforms import open_image
from vit.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
INDEX_VERSION = 1


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_class_dirs(root: str) -> list[str]:
    """Sorted class directory names; DataError if the root is missing or not an ImageFolder tree."""
    if not os.path.isdir(root):
        raise DataError(f"{root} does not exist or is not a directory")
    classes, stray = [], []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                classes.append(entry.name)
            elif is_image(entry.name):
                stray.append(entry.name)
    if stray:
        raise DataError(f"{root} has images at the top level (e.g. {stray[0]}); "
                        "expected one sub-directory per class (root/<synset>/<image>)")
    if not classes:
        raise DataError(f"{root} has no class sub-directories; expected root/<synset>/<image>")
    return sorted(classes)


def cached_index(root: str, cache_dir: str | None, name: str, fingerprint: str,
                 build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load the index `name` of `root` if a cached copy has this fingerprint, else build and cache it."""
    digest = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
    paths = [os.path.join(root, f".{name}.npz")]
    if cache_dir:
        paths.append(os.path.join(cache_dir, f"{name}-{digest}.npz"))
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["fingerprint"]) == fingerprint:
                    return {k: z[k] for k in z.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # missing, stale format or half-written by a killed job: rebuild
    index = build()
    index["fingerprint"] = np.array(fingerprint)
    for path in paths:
        tmp = f"{path}.{os.getpid()}.tmp"  # concurrent ranks each write their own, the rename is atomic
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **index)
            os.replace(tmp, path)
            if path != paths[0]:
                print(f"{root} is read-only: its index is cached in {path}", file=sys.stderr, flush=True)
            break
        except OSError:  # read-only dataset: try the next location
            if os.path.exists(tmp):
                os.remove(tmp)
    return index


def map_classes(root: str, own: list[str], classes: list[str] | None) -> tuple[list[str], np.ndarray]:
    """The class list (`classes`, else the dataset's own) and each own class's label in it."""
    classes = list(classes) if classes is not None else list(own)
    position = {c: i for i, c in enumerate(classes)}
    missing = [c for c in own if c not in position]
    if missing:
        raise DataError(f"{root} has {len(missing)} classes that the train classes lack (e.g. {missing[0]})")
    return classes, np.array([position[c] for c in own], dtype=np.int64)


def _stat_mtime(path: str) -> int:
    return os.stat(path).st_mtime_ns


def _no_images(class_dir: str) -> DataError:
    return DataError(f"class directory {class_dir} has no .jpg/.jpeg/.png/.webp images; remove it or add images")


def _visible_image(entry: os.DirEntry) -> bool:
    # Dot files such as macOS "._x.jpg" resource forks are not images.
    return is_image(entry.name) and not entry.name.startswith(".") and not entry.is_dir()


def _scan_class(class_dir: str) -> list[str]:
    with os.scandir(class_dir) as entries:
        names = sorted(e.name for e in entries if _visible_image(e))
    if not names:
        raise _no_images(class_dir)
    return names


def _has_image(class_dir: str) -> bool:
    with os.scandir(class_dir) as entries:
        return any(_visible_image(e) for e in entries)  # stops at the first, not a full listing


def check_classes(root: str, class_dirs: list[str], threads: int = 32) -> None:
    """DataError for the first class directory without an image; reads each only up to its first image."""
    with ThreadPoolExecutor(threads) as pool:
        for name, ok in zip(class_dirs, pool.map(_has_image, [os.path.join(root, c) for c in class_dirs])):
            if not ok:
                raise _no_images(os.path.join(root, name))


def _fingerprint(root: str, class_dirs: list[str], pool: ThreadPoolExecutor) -> str:
    mtimes = pool.map(_stat_mtime, [os.path.join(root, c) for c in class_dirs])
    text = "".join(f"{c}\t{m}\n" for c, m in zip(class_dirs, mtimes))
    return f"v{INDEX_VERSION}:" + hashlib.sha256(os.fsencode(text)).hexdigest()


def _build_index(root: str, class_dirs: list[str], pool: ThreadPoolExecutor) -> dict[str, np.ndarray]:
    per_class = list(pool.map(_scan_class, [os.path.join(root, c) for c in class_dirs]))
    encoded = [os.fsencode(n) for names in per_class for n in names]  # any byte name, as the OS has it
    name_offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(n) for n in encoded], out=name_offsets[1:])
    class_offsets = np.zeros(len(class_dirs) + 1, dtype=np.int64)
    np.cumsum([len(names) for names in per_class], out=class_offsets[1:])
    return {"classes": np.array(class_dirs), "class_offsets": class_offsets,
            "names": np.frombuffer(b"".join(encoded), dtype=np.uint8), "name_offsets": name_offsets}


class ImageFolder:
    """Map-style source over an ImageFolder tree; `transform(pil_image, rng)` makes the tensor.

    `classes` maps the tree onto another class list (e.g. an ImageNet-1k val tree onto the
    ImageNet-21k classes): labels are positions in it, and every class dir must appear in it.
    """

    def __init__(self, root: str, transform, cache_dir: str | None = None, classes: list[str] | None = None,
                 threads: int = 32):
        self.root, self.transform = root, transform
        class_dirs = list_class_dirs(root)
        with ThreadPoolExecutor(threads) as pool:
            index = cached_index(root, cache_dir, "imagefolder-index", _fingerprint(root, class_dirs, pool),
                                 lambda: _build_index(root, class_dirs, pool))
        self.class_dirs = index["classes"].tolist()
        self.class_offsets, self.names, self.name_offsets = (
            index["class_offsets"], index["names"], index["name_offsets"])
        self.classes, self.dir_labels = map_classes(root, self.class_dirs, classes)

    def __len__(self) -> int:
        return len(self.name_offsets) - 1

    def _class_dir(self, index: int) -> int:
        return int(np.searchsorted(self.class_offsets, index, side="right")) - 1

    def relpath(self, index: int) -> str:
        name = os.fsdecode(self.names[self.name_offsets[index]:self.name_offsets[index + 1]].tobytes())
        return f"{self.class_dirs[self._class_dir(index)]}/{name}"

    def label(self, index: int) -> int:
        return int(self.dir_labels[self._class_dir(index)])

    def sample_labels(self) -> np.ndarray:
        return np.repeat(self.dir_labels, np.diff(self.class_offsets))

    def sample_keys(self) -> Iterator[bytes]:
        """Relative paths as bytes, in index order (for a deterministic hold-out split)."""
        names, offsets = self.names.tobytes(), self.name_offsets.tolist()
        for d, c in enumerate(self.class_dirs):
            prefix = os.fsencode(f"{c}/")
            for i in range(int(self.class_offsets[d]), int(self.class_offsets[d + 1])):
                yield prefix + names[offsets[i]:offsets[i + 1]]

    def describe(self, index: int) -> str:
        return os.path.join(self.root, self.relpath(index))

    def load(self, index: int, rng: random.Random) -> tuple[torch.Tensor, int]:
        with open_image(self.describe(index)) as img:
            return self.transform(img, rng), self.label(index)
