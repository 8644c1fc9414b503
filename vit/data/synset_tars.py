"""The official ImageNet-21K releases, read in place with no conversion pass (one would cost a day and
double 1.3 TB of disk): fall11_whole.tar or winter21_whole.tar, an outer tar holding one `<wnid>.tar`
per synset, each of `<wnid>_<id>.JPEG` images; or a folder of such per-synset tars (the outer tar
extracted, or synsets downloaded one by one).

The classes are the synsets, sorted. The index (each image's tar, offset and size) is built once, the
per-synset tars read by a pool of threads, and cached like the other indexes: beside the data, or in
the run dir when the data is read-only. A nested tar's members are indexed by opening the outer file
at the inner tar's offset, so their offsets are already positions in the outer file and a sample is
one `os.pread` there, through the shard reader (TarSamples).

A gzipped outer tar (winter21_whole.tar.gz) has no offsets to read at: it must be extracted once,
which leaves the per-synset tars, readable here as a folder.
"""
from __future__ import annotations

import os
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vit.data.imagefolder import cached_index, is_image
from vit.data.shards import TarSamples, fingerprint, index_in_parallel, samples_index
from vit.errors import DataError


def gzip_error(path: str) -> DataError:
    name = os.path.basename(path)
    target = os.path.join(os.path.dirname(path), name.removesuffix(".gz").removesuffix(".tgz").removesuffix(".tar"))
    return DataError(f"{path} is gzipped, and a gzipped tar cannot be read by offset; extract it once "
                     f"(the per-synset tars inside stay tars): mkdir -p {target} && tar -xzf {path} -C {target}, "
                     f"then set data.root={target}")


def is_gzipped(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def list_synset_tars(root: str) -> list[str]:
    """The `<wnid>.tar` files of a folder, sorted; DataError if there are none."""
    if not os.path.isdir(root):
        raise DataError(f"{root} does not exist or is not a directory")
    tars = sorted(n for n in os.listdir(root) if n.endswith(".tar") and not n.startswith("."))
    if not tars:
        raise DataError(f"{root} has no per-synset .tar files (<wnid>.tar)")
    return tars


def _inner_tars(path: str) -> list[tuple[str, int]]:
    """(synset, data offset) of each per-synset tar inside an outer tar, in tar order."""
    if is_gzipped(path):
        raise gzip_error(path)
    try:
        with tarfile.open(path, "r:") as outer:
            return [(os.path.basename(m.name)[:-4], m.offset_data) for m in outer
                    if m.isfile() and m.name.endswith(".tar")]
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path} is not a readable uncompressed tar: {e}") from None


def _index_synset(path: str, start: int, synset: str, label: int) -> tuple[list[bytes], list[int], list[int], list[int]]:
    """Keys (`<synset>/<member>`), data offsets in `path`, sizes and labels of one per-synset tar's
    images; the tar starts at byte `start` of `path`."""
    keys, offsets, sizes = [], [], []
    try:
        with open(path, "rb") as f:
            f.seek(start)
            with tarfile.open(fileobj=f, mode="r:") as tar:  # offsets count from the file's start
                for member in tar:
                    if member.isfile() and is_image(member.name):
                        keys.append(f"{synset}/{member.name}".encode())
                        offsets.append(member.offset_data)
                        sizes.append(member.size)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: the tar of {synset} is unreadable: {e}") from None
    return keys, offsets, sizes, [label] * len(keys)


def _build_index(path: str, tars: list[tuple[str, str, int]], pool: ThreadPoolExecutor) -> dict[str, np.ndarray]:
    """`tars`: (file, synset, start) in class order; one tar per file, or all in one outer file."""
    files = sorted({file for file, _, _ in tars})
    jobs = [(os.path.join(os.path.dirname(path) if os.path.isfile(path) else path, file), start, synset, label)
            for label, (file, synset, start) in enumerate(tars)]
    per_tar = index_in_parallel(pool, lambda job: _index_synset(*job), jobs, path)
    if os.path.isfile(path):  # nested: every image lives in the one outer file
        per_tar = [tuple([v for part in per_tar for v in part[i]] for i in range(4))]
    return {**samples_index(files, per_tar), "classes": np.array([synset for _, synset, _ in tars])}


class SynsetTars(TarSamples):
    """An outer release tar (`root` is the .tar file) or a folder of `<wnid>.tar` files."""

    def __init__(self, root: str, transform, cache_dir: str | None = None, classes: list[str] | None = None,
                 threads: int = 16):
        if os.path.isfile(root):
            folder, name = os.path.split(os.path.abspath(root))
            tars = [(name, synset, start) for synset, start in sorted(_inner_tars(root))]
            if not tars:
                raise DataError(f"{root} holds no per-synset .tar files")
            files, index_name = [name], f"synset-index-{name}"
        else:
            folder = root
            files = list_synset_tars(root)
            tars = [(file, file[:-4], 0) for file in files]
            index_name = "synset-index"
        with ThreadPoolExecutor(threads) as pool:
            index = cached_index(folder, cache_dir, index_name, fingerprint(folder, files),
                                 lambda: _build_index(root, tars, pool))
        super().__init__(folder, transform, index, index["classes"].tolist(), classes, root)
