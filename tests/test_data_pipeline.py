"""The ImageNet-21k input pipeline on tiny real-format datasets: transforms, ImageFolder and shard
sources, the converter, bad files, split and resume determinism through the lead's loader."""
from __future__ import annotations

import gzip
import io
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from datasets import CLASSES, backdate, jpeg_bytes, make_21k_p, make_imagefolder, make_synset_tars, make_timm_wds
from helpers import data_config, run_job
from PIL import Image

from vit.data import imagefolder, synset_tars, transforms
from vit.data.imagefolder import ImageFolder
from vit.data.loader import DataPosition, RankBatches, build_loader, epoch_order, sample_seed
from vit.data.shards import Shards, convert
from vit.data.sources import build_source, check_data
from vit.data.transforms import build_transform, sample_crop
from vit.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # output pixels: the tests are about data, not image quality


def cfg(fmt: str, root, **extra) -> dict:
    """The recipe's data config on `root`, without the recipe's class count and hold-out unless given."""
    return data_config("imagenet21k", **{"format": fmt, "root": root and str(root), "img_size": SIZE,
                                         "num_classes": None, "val_per_class": None, **extra})


def transform(train: bool, **keys):
    return build_transform(data_config("imagenet21k", **keys), train=train)


MEAN, STD = data_config("imagenet21k")["mean"], data_config("imagenet21k")["std"]


def jpeg(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(jpeg_bytes(width, height, seed)))


# ---------------------------------------------------------------- transforms

def test_train_transform_shape_dtype_normalisation_and_determinism():
    plain = transform(True, img_size=32, color_jitter=0)
    mean_colour = tuple(round(255 * m) for m in MEAN)
    x = plain(Image.new("RGB", (50, 40), mean_colour), random.Random(0))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
    assert x.abs().max() < 0.01  # the mean colour normalises to 0
    white = plain(Image.new("RGB", (50, 40), (255, 255, 255)), random.Random(0))
    expected = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(white, expected.view(3, 1, 1).expand(3, 32, 32))

    train = transform(True, img_size=32)
    a, b = (train(jpeg(64, 48), random.Random(5)) for _ in range(2))
    assert torch.equal(a, b)  # all randomness comes from the rng
    assert not torch.equal(a, train(jpeg(64, 48), random.Random(6)))


@pytest.mark.parametrize("op, adjust", enumerate([T.functional.adjust_brightness, T.functional.adjust_contrast,
                                                  T.functional.adjust_saturation]))
def test_colour_jitter_ops_match_torchvision(op, adjust):
    image = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(op))
    for factor in (0.6, 0.95, 1.4):
        ours = image * 255
        transforms._jitter(ours, op, factor)
        torch.testing.assert_close(ours / 255, adjust(image, factor), atol=1e-5, rtol=0)


def test_sample_crop_matches_torchvision():
    torch.manual_seed(0)
    rng = random.Random(0)
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    ours = np.array([sample_crop(500, 375, scale, ratio, rng) for _ in range(4000)])
    theirs = np.array([T.RandomResizedCrop.get_params(torch.empty(1, 375, 500), list(scale), list(ratio))
                       for _ in range(4000)])
    for boxes in (ours, theirs):
        assert (boxes[:, 0] + boxes[:, 2] <= 375).all() and (boxes[:, 1] + boxes[:, 3] <= 500).all()
    area = lambda b: b[:, 2] * b[:, 3] / (500 * 375)  # noqa: E731
    assert abs(area(ours).mean() - area(theirs).mean()) < 0.02
    assert abs(np.log(ours[:, 3] / ours[:, 2]).mean() - np.log(theirs[:, 3] / theirs[:, 2]).mean()) < 0.03
    # 10 failed attempts on a sliver: both fall back to the same centred crop
    assert sample_crop(1000, 10, scale, ratio, rng) == tuple(
        T.RandomResizedCrop.get_params(torch.empty(1, 10, 1000), list(scale), list(ratio)))


def test_transforms_match_torchvision_geometry():
    image = jpeg(70, 50, seed=3)
    image.load()
    tv_normalize = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    level = 1 / 255 / min(STD)  # one grey level, normalised
    # eval: Resize(36) + CenterCrop(32)
    ours = transform(False, img_size=32, eval_crop_pct=0.875)(image)  # 32 / 0.875 -> 36
    theirs = tv_normalize(T.CenterCrop(32)(T.Resize(36)(image)))
    assert ours.shape == (3, 32, 32) and ours.is_contiguous()
    assert (ours - theirs).abs().max() <= 2 * level
    # train with the whole image as the crop, no flip, no jitter: Resize((32, 32))
    whole = transform(True, img_size=32, scale=(1, 1), ratio=(70 / 50, 70 / 50), hflip=0,
                             color_jitter=0)(image, random.Random(0))
    assert (whole - tv_normalize(T.Resize((32, 32))(image))).abs().max() <= 2 * level


def test_draft_decoding_keeps_the_crop_boxes(monkeypatch):
    """Reduced-size DCT decoding changes how a crop is decoded, never which crop is taken."""
    data = jpeg_bytes(1280, 960, seed=4)
    train = transform(True, img_size=64)
    boxes, reductions = [], []
    real_sample, real_decode = transforms.sample_crop, transforms.decode

    def spy_sample(*args):
        boxes.append(real_sample(*args))
        return boxes[-1]

    def spy_decode(*args):
        img, reduction = real_decode(*args)
        reductions.append(reduction)
        return img, reduction

    monkeypatch.setattr(transforms, "sample_crop", spy_sample)
    monkeypatch.setattr(transforms, "decode", spy_decode)
    run = lambda: [train(Image.open(io.BytesIO(data)), random.Random(seed)) for seed in range(40)]  # noqa: E731
    drafted = run()
    drafted_boxes, drafted_reductions = boxes[:], reductions[:]
    boxes.clear()
    monkeypatch.setattr(transforms, "draft_factor", lambda *args: 1)
    full = run()

    assert boxes == drafted_boxes  # same boxes on the original image, so the same scale distribution
    assert set(drafted_reductions) <= {1, 2, 4, 8} and sum(r > 1 for r in drafted_reductions) >= 20
    for box, reduction in zip(drafted_boxes, drafted_reductions):
        assert min(box[2], box[3]) / reduction >= 64  # the reduced crop still has the output resolution
    diffs = torch.stack([(a - b).abs().mean() for a, b in zip(drafted, full)])
    assert diffs.max() < 0.06  # < 4 grey levels on average: the same picture


def test_16_bit_grayscale_decodes_like_its_8_bit_version(tmp_path):
    """PIL's convert("RGB") clamps 16-bit values at 255: without scaling, such a PNG would train as white."""
    values = np.random.default_rng(0).integers(0, 65536, (48, 64), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    Image.fromarray((values >> 8).astype(np.uint8)).save(tmp_path / "eight.png")
    with Image.open(tmp_path / "deep.png") as deep, Image.open(tmp_path / "eight.png") as eight:
        assert deep.mode.startswith("I;16")
        assert np.array_equal(np.asarray(transforms.decode(deep)[0]), np.asarray(transforms.decode(eight)[0]))
    Image.fromarray(values.astype(np.float32)).save(tmp_path / "float.tiff")
    with Image.open(tmp_path / "float.tiff") as floating, pytest.raises(ValueError):  # skipped and counted
        transforms.decode(floating)


# ---------------------------------------------------------------- ImageFolder

def test_imagefolder_index_is_built_once_and_rebuilt_when_a_file_is_added(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "train")
    backdate(root)
    scanned = []
    real_scan = imagefolder._scan_class
    monkeypatch.setattr(imagefolder, "_scan_class", lambda d: scanned.append(d) or real_scan(d))

    first = ImageFolder(str(root), transform=None)
    assert len(scanned) == 3 and (root / ".imagefolder-index.npz").exists()
    assert first.classes == list(CLASSES) and len(first) == 12
    assert [first.label(i) for i in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
    again = ImageFolder(str(root), transform=None)
    assert len(scanned) == 3  # read from the cache, no listing
    assert [again.relpath(i) for i in range(12)] == [first.relpath(i) for i in range(12)]

    (root / CLASSES[1] / "added.jpg").write_bytes(jpeg_bytes(30, 30, seed=9))
    grown = ImageFolder(str(root), transform=None)
    assert len(scanned) == 6 and len(grown) == 13
    assert f"{CLASSES[1]}/added.jpg" in [grown.relpath(i) for i in range(13)]


def test_imagefolder_index_falls_back_to_the_cache_dir(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "train")
    (root / ".imagefolder-index.npz").mkdir()  # the root refuses the cache file (as a read-only one would)
    scanned = []
    real_scan = imagefolder._scan_class
    monkeypatch.setattr(imagefolder, "_scan_class", lambda d: scanned.append(d) or real_scan(d))
    for _ in range(2):
        assert len(ImageFolder(str(root), transform=None, cache_dir=str(tmp_path / "run"))) == 12
    assert len(scanned) == 3 and len(list((tmp_path / "run").glob("imagefolder-index-*.npz"))) == 1


def test_imagefolder_layout_errors(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "ILSVRC2012_val_00000001.JPEG").write_bytes(jpeg_bytes(20, 20, 0))
    (tmp_path / "bare").mkdir()
    root = make_imagefolder(tmp_path / "train")
    (root / "n09999999").mkdir()
    for path, message in [(tmp_path / "missing", "does not exist"), (tmp_path / "flat", "at the top level"),
                          (tmp_path / "bare", "no class sub-directories"), (root, "n09999999 has no")]:
        with pytest.raises(DataError, match=message):
            ImageFolder(str(path), transform=None)


def test_a_file_name_that_is_not_utf8_is_indexed_and_loaded(tmp_path):
    root = make_imagefolder(tmp_path / "train")
    os.rename(root / CLASSES[0] / f"{CLASSES[0]}_0.JPEG", os.fsencode(root / CLASSES[0]) + b"/caf\xe9.jpg")
    os.rename(root / CLASSES[2], os.fsencode(root) + b"/n0\xe9")  # and a class directory
    config = cfg("imagefolder", root, val_fraction=0.5)
    names = [build_source(config, split) for split in ("train", "val")]
    folder = names[0].source
    paths = [folder.relpath(i) for i in range(len(folder))]
    assert f"{CLASSES[0]}/caf\udce9.jpg" in paths
    image, label = folder.load(paths.index(f"{CLASSES[0]}/caf\udce9.jpg"), random.Random(0))
    assert label == 0 and image.shape == (3, SIZE, SIZE)
    assert folder.classes == [CLASSES[0], CLASSES[1], "n0\udce9"] and folder.label(len(folder) - 1) == 2


# ---------------------------------------------------------------- shards

def test_shards_raise_the_soft_limit_on_open_files_to_keep_every_shard_open(tmp_path):
    """Slurm passes on the login node's soft limit (often 1024): with more shards than a quarter of
    it, nearly every random read would reopen a shard."""
    convert(str(make_imagefolder(tmp_path / "train")), str(tmp_path / "shards"), samples_per_shard=5)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        shards = Shards(str(tmp_path / "shards"), transform=None)
        raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised > 64 and raised in (hard, 1 << 16) and shards.max_open == raised // 4
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

def test_converter_writes_shards_that_give_the_imagefolder_samples(tmp_path):
    root = make_imagefolder(tmp_path / "train")
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "vit.data.shards", "convert", str(root), str(out),
                           "--samples-per-shard", "5", "--workers", "2"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 12 samples of 3 classes in 3 shards" in proc.stdout
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(3)]
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert tar.getnames()[0] in ("000000.jpg", "000000.png") and tar.getnames()[1] == "000000.cls"

    train = transform(True, img_size=SIZE)
    folder, shards = ImageFolder(str(root), train), Shards(str(out), train)
    assert shards.classes == folder.classes and len(shards) == len(folder)
    by_bytes = {(root / folder.relpath(i)).read_bytes(): i for i in range(len(folder))}
    matched = []
    for j in range(len(shards)):
        shard = (out / shards.shards[shards._shard(j)]).read_bytes()
        i = by_bytes[shard[shards.offsets[j]:shards.offsets[j] + shards.sizes[j]]]
        matched.append(i)
        image_f, label_f = folder.load(i, random.Random(j))
        image_s, label_s = shards.load(j, random.Random(j))
        assert label_f == label_s and torch.equal(image_f, image_s)
    assert sorted(matched) == list(range(12)) and matched != list(range(12))  # all, shuffled

    with pytest.raises(DataError, match="already holds"):
        convert(str(root), str(out))


# ---------------------------------------------------------------- through the lead's loader

@pytest.fixture(scope="module")
def real_sources(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    root = make_imagefolder(tmp / "train", per_class=6)  # 18 samples
    convert(str(root), str(tmp / "shards"), samples_per_shard=7, workers=2)
    make_synset_tars(tmp / "fall11", per_class=6, outer="fall11_whole.tar")
    make_timm_wds(tmp / "wds", train_per_class=6, image="webp")
    return {fmt: build_source(cfg("auto", tmp / name), "train") for fmt, name in
            [("imagefolder", "train"), ("shards", "shards"), ("synset_tars", "fall11/fall11_whole.tar"),
             ("timm_webp", "wds")]}


def global_batches(source, world_size: int, start: DataPosition, steps: int, workers: int = 0):
    """Each step's whole global batch (6 samples = 2 micro-batches of 3), put back together from all ranks."""
    loaders = [iter(build_loader(source, global_batch=6, micro_batch=3, rank=r, world_size=world_size, seed=7,
                                 start=start, num_workers=workers)) for r in range(world_size)]
    out = []
    for _ in range(steps):
        per_rank = [[next(loader) for _ in range(2 // world_size)] for loader in loaders]
        chunks = [per_rank[k % world_size][k // world_size] for k in range(2)]  # chunk k went to rank k % W
        out.append((torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])))
    return out


@pytest.mark.parametrize("fmt", ["imagefolder", "shards", "synset_tars", "timm_webp"])
def test_ranks_are_disjoint_and_cover_the_epoch(real_sources, fmt):
    n = len(real_sources[fmt])
    steps = n // 4  # global batch 4: 16 of the 18 samples per epoch, 2 dropped
    seen = [[pair for batch in islice(RankBatches(n, 4, 2, rank, 2, 7, DataPosition()), steps) for pair in batch]
            for rank in range(2)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted((0, int(i)) for i in epoch_order(n, 7, 0)[:16])


@pytest.mark.parametrize("fmt", ["imagefolder", "shards", "synset_tars", "timm_webp"])
def test_resume_mid_epoch_across_world_sizes_is_bitwise_identical(real_sources, fmt):
    source = real_sources[fmt]
    reference = global_batches(source, world_size=1, start=DataPosition(), steps=5)  # crosses an epoch
    mid = DataPosition()
    for _ in range(2):
        mid.advance(len(source), 6)
    assert (mid.epoch, mid.offset) == (0, 12)
    runs = {
        "2 ranks from the start": (global_batches(source, 2, DataPosition(), 5, workers=2), reference),
        "1 -> 2 ranks": (global_batches(source, 2, mid, 3, workers=2), reference[2:]),
        "2 -> 1 rank": (global_batches(source, 1, mid, 3, workers=1), reference[2:]),
    }
    for name, (got, want) in runs.items():
        for (images, labels), (ref_images, ref_labels) in zip(got, want, strict=True):
            assert torch.equal(labels, ref_labels) and torch.equal(images, ref_images), name


@pytest.mark.parametrize("fmt", ["imagefolder", "shards"])
def test_bad_files_are_skipped_replaced_deterministically_and_counted(tmp_path, fmt):
    root = make_imagefolder(tmp_path / "train")
    good = (root / CLASSES[0] / f"{CLASSES[0]}_0.JPEG").read_bytes()
    (root / CLASSES[0] / "truncated.jpg").write_bytes(good[:len(good) // 2])
    (root / CLASSES[2] / "garbage.jpg").write_bytes(b"not an image" * 50)
    if fmt == "shards":
        convert(str(root), str(tmp_path / "shards"), samples_per_shard=5)
    source = build_source(cfg(fmt, tmp_path / ("train" if fmt == "imagefolder" else "shards")), "train")
    n = len(source)
    assert n == 14

    loadable = []
    for i in range(n):
        try:
            source.load(i, random.Random(0))
            loadable.append(True)
        except (OSError, ValueError):
            loadable.append(False)
    assert loadable.count(False) == 2

    def one_epoch(workers):
        loader = build_loader(source, global_batch=n, micro_batch=7, rank=0, world_size=1, seed=3,
                              start=DataPosition(), num_workers=workers)
        return list(islice(loader, 2))

    batches = one_epoch(0)
    images = torch.cat([b[0] for b in batches])
    order = epoch_order(n, 3, 0).tolist()
    for position, index in enumerate(order):  # a bad sample becomes a loadable one drawn from (seed, epoch, index)
        replacement, attempt = index, 0
        while not loadable[replacement]:
            attempt += 1
            replacement = sample_seed(3, 0, index, attempt) % n
        assert torch.equal(images[position], images[order.index(replacement)])
    assert sum(b[2] for b in batches) == 2
    messages = [b[3] for b in batches if b[3]]
    assert messages and all(str(tmp_path) in m for m in messages)

    again = one_epoch(2)
    assert torch.equal(torch.cat([b[0] for b in again]), images)
    assert [b[2] for b in again] == [b[2] for b in batches]


def test_a_run_of_unreadable_files_counts_each_once_and_does_not_end_the_epoch(tmp_path):
    """Sixteen empty files next to each other (an interrupted copy) among 12 good ones."""
    root = make_imagefolder(tmp_path / "train")
    for k in range(16):
        (root / CLASSES[1] / f"zz_broken_{k:02d}.jpg").write_bytes(b"")
    source = build_source(cfg("imagefolder", root), "train")
    n = len(source)
    assert n == 28
    loader = build_loader(source, global_batch=n, micro_batch=n, rank=0, world_size=1, seed=0, start=DataPosition())
    images, labels, bad, first_bad = next(iter(loader))
    assert bad == 16 and "zz_broken_" in first_bad
    assert images.shape[0] == n and torch.isfinite(images).all()


# ---------------------------------------------------------------- config: sources, splits, check_data

def test_val_fraction_holds_out_a_stable_disjoint_part(tmp_path):
    make_imagefolder(tmp_path / "train", per_class=10)
    config = cfg("imagefolder", tmp_path / "train", val_fraction=0.3)
    train, val = build_source(config, "train"), build_source(config, "val")
    train_paths = {train.source.relpath(int(i)) for i in train.indices}
    val_paths = {val.source.relpath(int(i)) for i in val.indices}
    assert not train_paths & val_paths and len(train_paths | val_paths) == 30 and 3 <= len(val_paths) <= 15
    assert np.array_equal(build_source(config, "val").indices, val.indices)
    image, label = val.load(0, random.Random(0))
    assert image.shape == (3, SIZE, SIZE) and label == val.source.label(int(val.indices[0]))


def test_val_root_is_labelled_with_the_train_classes(tmp_path):
    make_imagefolder(tmp_path / "train")
    make_imagefolder(tmp_path / "val", classes=CLASSES[1:], per_class=2, seed=1)
    val = build_source(cfg("imagefolder", tmp_path / "train", val_root=str(tmp_path / "val")), "val")
    assert val.classes == list(CLASSES) and [val.label(i) for i in range(len(val))] == [1, 1, 2, 2]


def test_synthetic_format():
    config = data_config("synthetic", num_samples=8, num_classes=4, img_size=SIZE)
    train, val = build_source(config, "train"), build_source(config, "val")
    assert len(train) == 8 and len(val) == 256 and val.classes == train.classes
    # the same classes look the same in both splits (else val accuracy would be chance), other samples
    assert torch.equal(val.class_colour, train.class_colour)
    assert val.labels[:8] != train.labels  # other samples (4 classes: equal by chance with p = 4**-8)
    check_data(config)


def test_check_data_errors_are_one_line_and_name_the_key(tmp_path):
    root = make_imagefolder(tmp_path / "train")
    check_data(cfg("imagefolder", root, num_classes=3))
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "n02000000").mkdir()
    (tmp_path / "val" / "n02000000" / "x.jpg").write_bytes(jpeg_bytes(20, 20, 0))
    def expect(config, key, fix):
        with pytest.raises(DataError) as error:
            check_data(config)
        message = str(error.value)
        assert message.startswith(key) and fix in message and "\n" not in message, message

    expect(cfg("imagefolder", tmp_path / "missing"), "data.root: ", "does not exist")
    expect(cfg("imagefolder", root, num_classes=21841), "data.num_classes: ", "set data.num_classes=3")
    expect(cfg("imagefolder", root, val_root=str(tmp_path / "val")), "data.val_root: ", "data.root lacks")
    expect(cfg("shards", root), "data.root: ", "no .tar shards")
    expect({"format": "tfrecord"}, "data.format: ", "not one of")
    expect(cfg("imagefolder", None), "data.root ", "not set")
    expect({k: v for k, v in cfg("imagefolder", root).items() if k != "hflip"}, "data.hflip ", "is missing")
    expect(cfg("imagefolder", root, val_fraction=1.5), "data.val_fraction: ", "outside")
    (root / "n09999999").mkdir()
    expect(cfg("imagefolder", root), "data.root: ", "n09999999 has no")


def test_check_data_does_not_list_the_images(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "train")
    monkeypatch.setattr(imagefolder, "_scan_class", lambda d: pytest.fail("check_data listed a class"))
    check_data(cfg("imagefolder", root))
    assert not (root / ".imagefolder-index.npz").exists()


# ---------------------------------------------------------------- ImageNet-21K as it is distributed

# name -> (data.root, other data keys, what auto detection says, train size, val size); 3 synsets
DISTRIBUTIONS = {
    "fall11 release tar": ("fall11/fall11_whole.tar", {}, "an outer tar of per-synset tars", 12, 6),
    "per-synset tars": ("synsets", {}, "a folder of 3 per-synset tars", 12, 6),
    "timm shards": ("timm", {}, "4 WebDataset shards, 2 train and 2 val shards", 18, 6),
    "timm webp shards, no _info.json": ("timm-webp", {}, "4 WebDataset shards, 2 train and 2 val shards", 18, 6),
    "ImageNet-21K-P": ("21k-p/imagenet21k_train", {"val_root": "21k-p/imagenet21k_val"},
                       "an ImageFolder tree of 3 class directories", 18, 6),
}


@pytest.fixture(scope="module")
def distributions(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("in21k")
    make_synset_tars(tmp / "fall11", outer="fall11_whole.tar")
    make_synset_tars(tmp / "synsets")
    make_timm_wds(tmp / "timm")
    make_timm_wds(tmp / "timm-webp", image="webp", info=False)
    make_21k_p(tmp / "21k-p")
    return tmp


def distribution_cfg(tmp: Path, name: str, **extra) -> dict:
    root, keys = DISTRIBUTIONS[name][:2]
    return cfg("auto", tmp / root, val_per_class=2, **{k: str(tmp / v) for k, v in keys.items()}, **extra)


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_each_distribution_is_read_in_place_with_a_val_split_never_trained_on(distributions, name):
    config = distribution_cfg(distributions, name, num_classes=3)
    found, train_size, val_size = DISTRIBUTIONS[name][2:]
    assert found in check_data(config)
    train, val = build_source(config, "train"), build_source(config, "val")
    assert train.classes == val.classes == list(CLASSES)  # the synsets, in label order
    assert (len(train), len(val)) == (train_size, val_size)
    seen = {}
    for split, source in (("train", train), ("val", val)):
        for i in range(len(source)):
            image, label = source.load(i, random.Random(i))
            assert image.shape == (3, SIZE, SIZE) and CLASSES[label] in source.describe(i)  # named by its synset
            seen.setdefault(split, []).append((source.describe(i), label))
    assert not {d for d, _ in seen["train"]} & {d for d, _ in seen["val"]}
    for split in seen:  # every class in both splits, the val split evenly: 2 per class
        assert sorted(np.bincount([label for _, label in seen[split]])) == [len(seen[split]) // 3] * 3
    again = build_source(config, "val")
    assert [again.describe(i) for i in range(len(again))] == [d for d, _ in seen["val"]]


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_a_few_steps_train_on_each_distribution(distributions, name, tmp_path):
    root, paths = DISTRIBUTIONS[name][:2]
    keys = [f"data.{k}={distributions / v}" for k, v in {"root": root, **paths}.items()] + ["data.val_per_class=2"]
    proc = run_job(tmp_path / "run", "data=imagenet21k", *keys, "data.num_classes=3", "data.num_workers=0",
                   f"data.num_samples={DISTRIBUTIONS[name][3]}", "train.global_batch=4", "train.micro_batch=4",
                   "train.steps=2", "train.eval_every=2", "optim.warmup_steps=1")
    assert proc.stdout.splitlines()[0].startswith("data: ") and DISTRIBUTIONS[name][2] in proc.stdout.splitlines()[0]
    evaluation = json.loads((tmp_path / "run" / "eval" / "latest.json").read_text())
    assert math.isfinite(evaluation["val_top1"]), evaluation
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/train_state.json")).read_text())
    assert state["classes"] == list(CLASSES)  # the synset list travels with the checkpoint


def test_a_per_class_hold_out_is_the_same_count_per_class_and_keeps_half_of_small_classes(tmp_path):
    root = make_imagefolder(tmp_path / "train", per_class=9)
    for k in range(3):  # a synset of 3 images (fall11 has synsets of one): at most half is held out
        (root / "n09999999").mkdir(exist_ok=True)
        (root / "n09999999" / f"n09999999_{k}.JPEG").write_bytes(jpeg_bytes(20, 20, k))
    config = cfg("imagefolder", root, val_per_class=4)
    val, train = build_source(config, "val"), build_source(config, "train")
    assert np.bincount(val.source.sample_labels()[val.indices]).tolist() == [4, 4, 4, 1]
    assert not set(val.indices) & set(train.indices) and len(val) + len(train) == 30
    assert np.array_equal(build_source(config, "val").indices, val.indices)


def test_the_synset_tar_index_is_built_once_beside_the_data_or_in_the_run_dir(tmp_path, monkeypatch):
    outer = make_synset_tars(tmp_path / "fall11", outer="fall11_whole.tar")
    indexed = []
    real_index = synset_tars._index_synset
    monkeypatch.setattr(synset_tars, "_index_synset", lambda *a: indexed.append(a) or real_index(*a))
    for _ in range(2):
        assert len(build_source(cfg("synset_tars", outer), "train")) == 18
    assert len(indexed) == 3 and (tmp_path / "fall11" / ".synset-index-fall11_whole.tar.npz").exists()
    folder = make_synset_tars(tmp_path / "synsets")
    (folder / ".synset-index.npz").mkdir()  # the data refuses the cache file, as a read-only one would
    for _ in range(2):
        build_source(cfg("auto", folder), "train", cache_dir=str(tmp_path / "run"))
    assert len(indexed) == 6 and len(list((tmp_path / "run").glob("synset-index-*.npz"))) == 1


def test_imagenet21k_bad_input_is_one_line_naming_the_key_and_the_fix(distributions, tmp_path):
    def expect(call, config, key, fix):
        with pytest.raises(DataError) as error:
            call(config)
        message = str(error.value)
        assert message.startswith(key) and fix in message and "\n" not in message, message

    fall11 = distributions / "fall11" / "fall11_whole.tar"
    gzipped = tmp_path / "winter21_whole.tar.gz"
    with open(fall11, "rb") as f, gzip.open(gzipped, "wb") as out:
        shutil.copyfileobj(f, out)
    extract = f"mkdir -p {tmp_path / 'winter21_whole'} && tar -xzf {gzipped} -C {tmp_path / 'winter21_whole'}"
    expect(check_data, cfg("auto", gzipped), "data.root: ", extract)
    expect(check_data, cfg("synset_tars", gzipped), "data.root: ", extract)
    expect(check_data, cfg("auto", tmp_path), "data.root: ", extract)  # the folder the download sits in

    expect(check_data, cfg("auto", distributions / "synsets", num_classes=21841), "data.num_classes: ",
           "is 21841 but " + str(distributions / "synsets") + " has 3 classes; set data.num_classes=3")
    expect(lambda c: build_source(c, "train"), cfg("auto", fall11, num_classes=19167), "data.num_classes: ",
           "set data.num_classes=3")  # an outer tar's synsets are known once indexed, still before training

    small = make_imagefolder(tmp_path / "one-image-classes", per_class=1)
    expect(lambda c: build_source(c, "val"), cfg("auto", small, val_per_class=50), "data.val_per_class: ",
           "the val split is empty")
    expect(lambda c: build_source(c, "val"), cfg("auto", small, val_fraction=1e-6), "data.val_fraction: ",
           "the val split is empty")
    expect(lambda c: build_source(c, "val"), cfg("auto", small), "data.val_per_class: ", "e.g. data.val_per_class=50")

    expect(check_data, data_config("synthetic", root=str(small), num_samples=8, num_classes=3, img_size=SIZE),
           "data.root: ", "set data.format=auto")

    parent = distributions / "21k-p"
    fix = f"set data.root={parent / 'imagenet21k_train'} and data.val_root={parent / 'imagenet21k_val'}"
    expect(check_data, cfg("auto", parent), "data.root: ", fix)
    expect(check_data, cfg("imagefolder", parent), "data.root: ", fix)

    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    shutil.copy(distributions / "timm" / "imagenet22k-train-0000.tar", unnamed / "shard-000000.tar")
    with tarfile.open(unnamed / "shard-000000.tar", "a") as tar:
        info = tarfile.TarInfo("n99_x.json")
        data = json.dumps({"label": 5}).encode()  # a label no sample names
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        image = tarfile.TarInfo("n99_x.jpg")
        image.size = len(jpeg_bytes(20, 20, 0))
        tar.addfile(image, io.BytesIO(jpeg_bytes(20, 20, 0)))
    expect(lambda c: build_source(c, "train"), cfg("auto", unnamed), "data.root: ", "add a classes.json")


def test_a_data_root_with_the_synthetic_format_fails_in_one_line(tmp_path):
    """`experiment=smoke data.root=X` trained on generated images and ignored X without a word."""
    root = make_imagefolder(tmp_path / "train")
    proc = subprocess.run([sys.executable, "jobs/pretrain.py", "experiment=smoke", f"run_dir={tmp_path / 'run'}",
                           f"data.root={root}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: data.root: {root} is set, but data.format=synthetic trains on generated images; "
        "set data.format=auto to train on it, or data.root=null"], proc.stderr


# ---------------------------------------------------------------- benchmark

def test_benchmark_tiny_mode_runs(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/data.py", "--tiny", "--dir", str(tmp_path / "bench")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "img/s per core" in proc.stdout and "index build of 8 images: imagefolder" in proc.stdout
    ratios = next(line for line in proc.stdout.splitlines() if line.startswith("ratio ours/torchvision: "))
    assert all(f"{layout} " in ratios for layout in ("imagefolder", "synset_tars", "timm_jpg", "timm_webp"))


STOP_WITH_WORKERS = """
import os, signal
from vit.data.loader import DataPosition, build_loader
from vit.data.synthetic import SyntheticImages
from vit.stop import StopRequest

stop = StopRequest().install()  # before the loader, as in the training loop
batches = iter(build_loader(SyntheticImages(64, 4, 16, 0), global_batch=4, micro_batch=4, rank=0, world_size=1,
                            seed=0, start=DataPosition(), num_workers=2))
# Slurm's TERM reaches every process, here before the workers have had time to run their init.
for pid in [os.getpid(), *(w.pid for w in batches._workers)]:
    os.kill(pid, signal.SIGTERM)
for _ in range(5):
    next(batches)
print("stop:", stop.kind, flush=True)
# `batches` stays alive to the end, like a loader held by an exception's traceback: exit must not hang.
"""


def test_a_stop_signal_to_every_process_leaves_the_loader_workers_running():
    """scancel and a preemption TERM every process of the step. A worker killed by it crashed the rank
    ("DataLoader worker exited unexpectedly") before it could save, so a preempted run lost its steps
    since the last checkpoint and a cancelled one was requeued as a failure. A worker is open to it
    from its birth, before its init can ignore the signal."""
    proc = subprocess.run([sys.executable, "-c", STOP_WITH_WORKERS], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "stop: term" in proc.stdout, proc.stdout + proc.stderr[-3000:]
