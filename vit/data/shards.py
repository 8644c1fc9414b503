"""Tar shards in WebDataset layout, read by index: ours (shard-000000.tar holding 000123.jpg + 000123.cls,
and a classes.json) and timm's ImageNet-21K shards (imagenet22k-train-0000.tar and
imagenet22k-validation-0000.tar in one folder, each sample a .jpg or .webp, a .cls label and a .json
with class_name, the synset; an _info.json naming each split's shards).

We read the tars ourselves instead of with the `webdataset` library because that library streams:
a worker reads its shards front to back, so the data position is a per-worker stream offset that
depends on the number of ranks and workers, and a resume on another world size can only restart
shards (repeating or skipping samples). Here every sample is addressed by a global index: a
per-shard member index of (offset, size, label), built once with `tarfile` and cached like the
ImageFolder index (fingerprint: shard names, sizes and mtimes), makes the shards map-style, so the
lead's global-position sampler (vit/data/loader.py) gives the same exact, world-size-independent
order and resume as for any other source. Reading a sample is one `os.pread` on a shard file kept
open per worker process; the shards spare the file system the per-file opens and stats of 14M
small files, which is what parallel file systems are slow at, and random 100 KB reads are cheap.

Convert an ImageFolder tree (samples shuffled across shards with a fixed seed, bytes unchanged):
    python -m vit.data.shards convert <imagefolder_root> <out_dir> [--samples-per-shard N] [--workers K]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import resource
import sys
import tarfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from vit.data.imagefolder import ImageFolder, cached_index, map_classes
from vit.data.transforms import open_image
from vit.errors import DataError

CLASSES_FILE = "classes.json"
INFO_FILES = ("_info.json", "info.json")  # timm's reader_wds looks for them in this order
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # timm's default image keys, and ours
# timm's shard names (imagenet22k-train-0000.tar, imagenet22k-validation-0000.tar) name their split
SPLIT_IN_NAME = re.compile(r"[-_.](train|validation|val)[-_.]")


def list_shards(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise DataError(f"{root} does not exist or is not a directory")
    shards = sorted(n for n in os.listdir(root) if n.endswith(".tar"))
    if not shards:
        raise DataError(f"{root} has no .tar shards; write them with `python -m vit.data.shards convert`")
    return shards


def read_classes(root: str) -> list[str] | None:
    """The class names of classes.json in label order; None without one (labels are then named by
    the samples' .json class_name, as in timm's ImageNet-21K shards)."""
    path = os.path.join(root, CLASSES_FILE)
    try:
        with open(path) as f:
            classes = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable: {e}") from None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{path} must be a non-empty JSON list of class names")
    return classes


def shard_splits(root: str, shards: list[str]) -> dict[str, list[str]] | None:
    """Shard names per split ("train", "val") from _info.json/info.json, else from the `-train-` and
    `-validation-` in their names; None if the folder is one undivided dataset (our converter's)."""
    for info_file in INFO_FILES:
        path = os.path.join(root, info_file)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                splits = json.load(f)["splits"]
            named = {_split_name(name): list(split["filenames"]) for name, split in splits.items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} is not timm's info file ({{splits: {{<split>: {{filenames}}}}}}): {e}") from None
        missing = sorted(set(n for names in named.values() for n in names) - set(shards))
        if missing:
            raise DataError(f"{path} lists {len(missing)} shards that are missing (e.g. {missing[0]}); "
                            "copy them or remove the info file")
        return {split: names for split, names in named.items() if split in ("train", "val")}
    named = {}
    for shard in shards:
        match = SPLIT_IN_NAME.search(shard)
        if match:
            named.setdefault(_split_name(match.group(1)), []).append(shard)
    return named or None


def _split_name(name: str) -> str:
    return "val" if name in ("val", "validation") else name


def index_in_parallel(pool: ThreadPoolExecutor, index_one, items: list, what: str) -> list:
    """`index_one` over `items` in the pool, in order, with a progress line on stderr every tenth:
    indexing 21,841 synset tars or 4,096 shards reads every member header once, minutes on a
    parallel file system."""
    out, started, every = [], time.time(), max(1, len(items) // 10)
    for done, result in enumerate(pool.map(index_one, items), start=1):
        out.append(result)
        if done % every == 0 or done == len(items):
            print(f"indexing {what}: {done}/{len(items)} tars, {sum(len(r[0]) for r in out)} images, "
                  f"{time.time() - started:.0f} s", file=sys.stderr, flush=True)
    return out


def _index_shard(path: str) -> tuple[list[bytes], list[int], list[int], list[int], dict[int, str]]:
    """Keys, image data offsets, image sizes and labels of one shard's samples, in tar order, and the
    class name of each label whose samples carry a .json with class_name."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": random access needs an uncompressed tar
            for member in tar:
                directory, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")  # WebDataset: the key ends at the first dot
                if member.isfile() and dot:
                    samples.setdefault(f"{directory}/{stem}" if directory else stem, {})[ext.lower()] = member
            text = {(key, ext): tar.extractfile(m[ext]).read()
                    for key, m in samples.items() for ext in ("cls", "json") if ext in m}
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path} is not a readable uncompressed tar shard: {e}") from None
    keys, offsets, sizes, labels, names = [], [], [], [], {}
    for key, members in samples.items():
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        try:
            meta = json.loads(text[key, "json"]) if (key, "json") in text else {}
            label = int(text[key, "cls"]) if (key, "cls") in text else int(meta["label"])
        except (ValueError, KeyError, TypeError):
            label = None
        if image is None or label is None:
            raise DataError(f"{path}: sample {key} needs an image (.jpg/.jpeg/.png/.webp) and an integer label "
                            "(a .cls, or a .json with label)")
        if "class_name" in meta:
            names[label] = str(meta["class_name"])
        keys.append(key.encode())
        offsets.append(image.offset_data)
        sizes.append(image.size)
        labels.append(label)
    return keys, offsets, sizes, labels, names


def _build_index(root: str, shards: list[str], pool: ThreadPoolExecutor) -> dict[str, np.ndarray]:
    per_shard = index_in_parallel(pool, _index_shard, [os.path.join(root, s) for s in shards], root)
    names = {label: name for *_, shard_names in per_shard for label, name in shard_names.items()}
    index = samples_index(shards, per_shard)
    labels = int(index["labels"].max(initial=-1)) + 1
    return {**index, "class_names": np.array([names.get(label, "") for label in range(labels)], dtype=np.str_)}


def samples_index(tars: list[str], per_tar: list[tuple]) -> dict[str, np.ndarray]:
    """The arrays of TarSamples from each tar's (keys, offsets, sizes, labels, ...)."""
    tar_offsets = np.zeros(len(tars) + 1, dtype=np.int64)
    np.cumsum([len(part[0]) for part in per_tar], out=tar_offsets[1:])
    column = lambda i, dtype: np.array([v for part in per_tar for v in part[i]], dtype=dtype)  # noqa: E731
    return {"shards": np.array(tars), "shard_offsets": tar_offsets, "keys": column(0, np.bytes_),
            "offsets": column(1, np.int64), "sizes": column(2, np.int64), "labels": column(3, np.int64)}


def fingerprint(root: str, files: list[str]) -> str:
    stats = [os.stat(os.path.join(root, s)) for s in files]
    return "v2:" + "".join(f"{s}\t{st.st_size}\t{st.st_mtime_ns}\n" for s, st in zip(files, stats))


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 16
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a hard limit above the kernel's nr_open: keep the soft one
            pass
    return soft


class TarSamples:
    """Map-style source of images stored whole in tar files under `root`, read by offset.

    `index` holds the tars (`shards`, paths relative to root), where each one's samples start
    (`shard_offsets`), and per sample its key, data offset, size and label in `own_classes`;
    `classes` maps those labels onto another class list.
    """

    def __init__(self, root: str, transform, index: dict[str, np.ndarray], own_classes: list[str],
                 classes: list[str] | None, where: str):
        self.root, self.transform = root, transform
        self.shards, self.shard_offsets = index["shards"].tolist(), index["shard_offsets"]
        self.keys, self.offsets, self.sizes = index["keys"], index["offsets"], index["sizes"]
        labels = index["labels"]
        if not len(labels):
            raise DataError(f"{where}: the tars hold no images")
        if not 0 <= labels.min() <= labels.max() < len(own_classes):
            raise DataError(f"{where}: labels run {labels.min()}..{labels.max()} but there are "
                            f"{len(own_classes)} class names")
        self.classes, own_labels = map_classes(where, own_classes, classes)
        self.labels = own_labels[labels]
        # Each worker touches every tar in random order, so the cache must hold them all or nearly
        # every read reopens a tar on the parallel file system: take the hard fd limit (Slurm passes
        # on the login node's soft one, often 1024), and keep at most a quarter of it (torch shares
        # tensors between processes through fds too), least recently used closed first.
        self.max_open = max(8, raise_fd_limit() // 4)
        self._fds: OrderedDict[int, int] = OrderedDict()

    def __getstate__(self):
        # Workers open their own descriptors lazily. (Forked workers inherit the parent's: pread
        # has no shared file offset, so sharing them is safe.)
        return {**self.__dict__, "_fds": OrderedDict()}

    def __len__(self) -> int:
        return len(self.offsets)

    def _shard(self, index: int) -> int:
        return int(np.searchsorted(self.shard_offsets, index, side="right")) - 1

    def _fd(self, shard: int) -> int:
        fd = self._fds.pop(shard, None)
        if fd is None:
            fd = os.open(os.path.join(self.root, self.shards[shard]), os.O_RDONLY)
            if len(self._fds) >= self.max_open:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[shard] = fd  # (re)inserted last = most recently used
        return fd

    def shard_indices(self, names: list[str]) -> np.ndarray:
        """The sample indices of the tars `names`."""
        position = {s: i for i, s in enumerate(self.shards)}
        return np.concatenate([np.arange(self.shard_offsets[position[n]], self.shard_offsets[position[n] + 1])
                               for n in names] or [np.zeros(0, dtype=np.int64)])

    def sample_labels(self) -> np.ndarray:
        return self.labels

    def sample_keys(self) -> Iterator[bytes]:
        """`<tar>/<key>` as bytes, in index order (for a deterministic hold-out split)."""
        for s, shard in enumerate(self.shards):
            prefix = f"{shard}/".encode()
            for key in self.keys[self.shard_offsets[s]:self.shard_offsets[s + 1]].tolist():
                yield prefix + key

    def describe(self, index: int) -> str:
        return f"{os.path.join(self.root, self.shards[self._shard(index)])}:{self.keys[index].decode()}"

    def load(self, index: int, rng: random.Random) -> tuple[torch.Tensor, int]:
        size = int(self.sizes[index])
        data = os.pread(self._fd(self._shard(index)), size, int(self.offsets[index]))
        if len(data) != size:
            raise OSError(f"tar ends {size - len(data)} bytes early")
        with open_image(io.BytesIO(data)) as img:
            return self.transform(img, rng), int(self.labels[index])


class Shards(TarSamples):
    """A shard directory; class names from its classes.json, else from the samples' .json class_name.

    `splits` holds the sample indices of each split the folder declares (see `shard_splits`), or is None.
    """

    def __init__(self, root: str, transform, cache_dir: str | None = None, classes: list[str] | None = None,
                 threads: int = 16):
        shards = list_shards(root)
        with ThreadPoolExecutor(threads) as pool:
            index = cached_index(root, cache_dir, "shard-index", fingerprint(root, shards),
                                 lambda: _build_index(root, shards, pool))
        own_classes = read_classes(root) or index["class_names"].tolist()
        if "" in own_classes:
            raise DataError(f"{root}: label {own_classes.index('')} has no class name (no sample's .json has "
                            f"class_name); add a {CLASSES_FILE} listing the class names in label order")
        super().__init__(root, transform, index, own_classes, classes, root)
        splits = shard_splits(root, self.shards)
        self.splits = splits and {split: self.shard_indices(names) for split, names in splits.items()}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def convert(src: str, out: str, samples_per_shard: int = 10000, workers: int = 8, seed: int = 0) -> Shards:
    """Write an ImageFolder tree as shards (shuffled with `seed`), classes.json and the shard index."""
    if os.path.isdir(out) and any(n.endswith(".tar") for n in os.listdir(out)):
        raise DataError(f"{out} already holds .tar shards; remove them or choose another output directory")
    os.makedirs(out, exist_ok=True)
    folder = ImageFolder(src, transform=None, cache_dir=out)
    order = np.random.default_rng(seed).permutation(len(folder))
    width = max(6, len(str(len(folder) - 1)))
    starts = range(0, len(folder), samples_per_shard)

    def write(shard: int) -> None:
        path = os.path.join(out, f"shard-{shard:06d}.tar")
        first = starts[shard]
        with tarfile.open(path + ".tmp", "w") as tar:
            for position, i in enumerate(order[first:first + samples_per_shard].tolist(), start=first):
                relpath = folder.relpath(i)
                with open(os.path.join(src, relpath), "rb") as f:
                    data = f.read()
                ext = {".png": "png", ".webp": "webp"}.get(os.path.splitext(relpath)[1].lower(), "jpg")
                _add(tar, f"{position:0{width}d}.{ext}", data)
                _add(tar, f"{position:0{width}d}.cls", str(folder.label(i)).encode())
        os.replace(path + ".tmp", path)  # a killed run leaves no complete-looking partial shard
        print(f"{os.path.basename(path)}: samples {first}..{min(first + samples_per_shard, len(folder)) - 1}",
              file=sys.stderr, flush=True)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(write, range(len(starts))))
    with open(os.path.join(out, CLASSES_FILE), "w") as f:
        json.dump(folder.classes, f)
    return Shards(out, transform=None, threads=workers)  # builds and caches the member index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vit.data.shards", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("convert", help="write an ImageFolder tree as tar shards")
    c.add_argument("src", help="ImageFolder root (one directory per class)")
    c.add_argument("out", help="output directory for shard-NNNNNN.tar, classes.json and the index")
    c.add_argument("--samples-per-shard", type=int, default=10000, help="default 10000 (~1 GB of ImageNet)")
    c.add_argument("--workers", type=int, default=8, help="shards written in parallel (I/O bound threads)")
    c.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards")
    args = parser.parse_args(argv)
    try:
        shards = convert(args.src, args.out, args.samples_per_shard, args.workers, args.seed)
    except DataError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"wrote {len(shards)} samples of {len(shards.classes)} classes in {len(shards.shards)} shards to {args.out}")


if __name__ == "__main__":
    main()
