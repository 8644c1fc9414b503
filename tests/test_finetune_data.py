"""COCO detection and ADE20K segmentation sources on tiny real-format datasets: large-scale jitter
boxes, crowd and empty images, mmseg's label and crop conventions, layout checks, config dispatch
and batching through the lead's loader."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import COCO_CATEGORIES, COCO_CROWD_IMAGE_ID, make_ade20k, make_coco
from helpers import data_config
from PIL import Image

from vit.data.ade20k import ADE20K, check_ade20k, keep_ratio_size, reduce_zero_label
from vit.data.coco import CocoDetection, check_coco, segmentation_mask
from vit.data.loader import DataPosition, SeededSamples, build_loader, collate_samples
from vit.data.sources import build_source, check_data, dense_options
from vit.errors import DataError

S = 64
N_TRAIN, N_VAL = 12, 4
COCO_CFG, ADE_CFG = data_config("coco", img_size=S, masks=False), data_config("ade20k", img_size=S)
COCO, ADE = dense_options("coco", COCO_CFG), dense_options("ade20k", ADE_CFG)  # the recipe's source options


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco"), n_train=N_TRAIN, n_val=N_VAL)


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    return make_ade20k(tmp_path_factory.mktemp("ade"), n_train=8, n_val=3)


def pixels(image: torch.Tensor) -> torch.Tensor:
    """Normalised [3, H, W] -> 0..255."""
    return (image * torch.tensor(COCO["std"]).view(3, 1, 1) + torch.tensor(COCO["mean"]).view(3, 1, 1)) * 255


def json_boxes(root: Path, split: str) -> tuple[dict, dict]:
    """Non-crowd xyxy boxes and category ids by image id, and image sizes by id, from the JSON."""
    data = json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())
    boxes = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        if not a["iscrowd"]:
            x, y, w, h = a["bbox"]
            boxes[a["image_id"]].append((x, y, x + w, y + h, a["category_id"]))
    return boxes, {im["id"]: (im["width"], im["height"]) for im in data["images"]}


# ---------------------------------------------------------------- COCO

def test_coco_lsj_samples_boxes_match_the_drawn_shapes(coco):
    ds = CocoDetection(str(coco), "train", S, train=True, **COCO)
    assert ds.cat_ids == [1, 3, 7] and ds.classes == ["red", "green", "blue"]
    colour = {label: np.array(dict((i, c) for i, _, c in COCO_CATEGORIES)[cat_id])
              for label, cat_id in enumerate(ds.cat_ids, start=1)}
    _, sizes = json_boxes(coco, "train")
    checked, ratios = 0, []
    for i in range(len(ds)):
        for seed in range(8):
            image, target = ds.load(i, random.Random(seed))
            assert image.shape == (3, S, S) and image.dtype == torch.float32
            boxes, labels = target["boxes"], target["labels"]
            assert boxes.dtype == torch.float32 and boxes.shape[1] == 4 and labels.dtype == torch.int64
            assert isinstance(target["image_id"], int) and isinstance(target["scale"], float)
            width, height = sizes[target["image_id"]]
            ratios.append(target["scale"] * max(width, height) / S)
            new_w, new_h = round(width * target["scale"]), round(height * target["scale"])
            assert (image[:, :, new_w:] == 0).all() and (image[:, new_h:] == 0).all()  # padding, when any
            assert (boxes >= 0).all() and (boxes <= S).all() and (boxes[:, 2:] - boxes[:, :2] >= 1).all()
            assert ((labels >= 1) & (labels <= 3)).all()
            rgb = pixels(image)
            for (x0, y0, x1, y1), label in zip(boxes.tolist(), labels.tolist()):
                if x1 - x0 < 8 or y1 - y0 < 8:
                    continue
                # the middle half of a box lies inside its rectangle or ellipse, even when cropped
                dx, dy = (x1 - x0) / 4, (y1 - y0) / 4
                inner = rgb[:, round(y0 + dy):round(y1 - dy), round(x0 + dx):round(x1 - dx)]
                median = inner.flatten(1).median(1).values.numpy()
                assert min(colour, key=lambda c: np.abs(colour[c] - median).sum()) == label
                assert np.abs(colour[label] - median).max() < 40
                checked += 1
    assert checked > 40
    assert 0.1 <= min(ratios) < 0.4 and 1.6 < max(ratios) <= 2.0  # r ~ U(0.1, 2.0)


def test_coco_lsj_masks_follow_the_image(coco):
    """Training masks are cut, scaled and flipped with the image: each lies in its box and covers
    pixels of its category's colour."""
    ds = CocoDetection(str(coco), "train", S, train=True, **{**COCO, "masks": True})
    colour = {label: np.array(dict((i, c) for i, _, c in COCO_CATEGORIES)[cat_id])
              for label, cat_id in enumerate(ds.cat_ids, start=1)}
    checked = 0
    for i in range(len(ds)):
        for seed in range(4):
            image, target = ds.load(i, random.Random(seed))
            h, w = target["image_size"]
            masks, boxes = target["masks"], target["boxes"]
            assert masks.dtype == torch.uint8 and masks.shape == (len(boxes), h, w)
            rgb = pixels(image)[:, :h, :w]
            for mask, (x0, y0, x1, y1), label in zip(masks.bool(), boxes.tolist(), target["labels"].tolist()):
                ys, xs = mask.nonzero(as_tuple=True)
                if len(ys) < 16:
                    continue
                assert x0 - 1 <= xs.min() and xs.max() < x1 + 1 and y0 - 1 <= ys.min() and ys.max() < y1 + 1
                assert np.abs(rgb[:, mask].median(1).values.numpy() - colour[label]).max() < 40
                checked += 1
    assert checked > 20


def test_coco_crowd_rle_decodes_to_the_drawn_region(coco):
    data = json.loads((coco / "annotations" / "instances_train2017.json").read_text())
    crowd = next(a for a in data["annotations"] if a["iscrowd"])
    image = next(im for im in data["images"] if im["id"] == crowd["image_id"])
    assert isinstance(crowd["segmentation"]["counts"], list)  # uncompressed, as COCO's crowd regions
    mask = segmentation_mask(crowd["segmentation"], image["height"], image["width"])
    assert mask.shape == (image["height"], image["width"]) and mask.sum() == crowd["area"] == 9 * 16
    rgb = np.array(Image.open(coco / "train2017" / image["file_name"]))
    red, green, blue = np.median(rgb[mask.astype(bool)], 0)  # 4 x 4 squares: JPEG blurs them towards the noise
    assert red - max(green, blue) > 80


def test_coco_same_rng_same_sample(coco):
    ds = CocoDetection(str(coco), "train", S, train=True, **COCO)
    (a, ta), (b, tb), (c, _) = (ds.load(3, random.Random(seed)) for seed in (7, 7, 8))
    assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and ta["scale"] == tb["scale"]
    assert not torch.equal(a, c)


def test_coco_eval_scale_maps_boxes_back_to_the_json(coco):
    ds = CocoDetection(str(coco), "val", S, train=False, **COCO)
    boxes, sizes = json_boxes(coco, "val")
    assert len(ds) == N_VAL and ds.image_ids == sorted(boxes)  # the empty image too
    for i in range(len(ds)):
        image, target = ds.load(i, random.Random(i))
        width, height = sizes[target["image_id"]]
        assert target["scale"] == S / max(width, height)
        new_w, new_h = round(width * target["scale"]), round(height * target["scale"])
        assert max(new_w, new_h) == S and (image[:, new_h:, :] == 0).all() and (image[:, :, new_w:] == 0).all()
        assert image[:, :new_h, :new_w].abs().sum(0).min() > 0
        expected = torch.tensor(boxes[target["image_id"]], dtype=torch.float32).reshape(-1, 5)
        torch.testing.assert_close(target["boxes"] / target["scale"], expected[:, :4])
        assert [ds.cat_ids[label - 1] for label in target["labels"]] == expected[:, 4].long().tolist()


def test_coco_crowd_and_empty_images_are_never_training_targets(coco):
    train = CocoDetection(str(coco), "train", S, train=True, **COCO)
    boxes, _ = json_boxes(coco, "train")
    empty = max(boxes)
    assert not boxes[empty] and len(train) == N_TRAIN - 1 and empty not in train.image_ids
    assert empty in CocoDetection(str(coco), "train", S, train=False, **COCO).image_ids

    # with r = 1 and no flip, LSJ is the eval resize: exactly the non-crowd boxes come back
    fixed = CocoDetection(str(coco), "train", S, train=True, **{**COCO, "scale_range": (1, 1)}, hflip=False)
    index = fixed.image_ids.index(COCO_CROWD_IMAGE_ID)
    _, target = fixed.load(index, random.Random(0))
    non_crowd = torch.tensor(boxes[COCO_CROWD_IMAGE_ID], dtype=torch.float32)[:, :4]
    torch.testing.assert_close(target["boxes"] / target["scale"], non_crowd)
    for seed in range(10):
        assert len(train.load(index, random.Random(seed))[1]["labels"]) <= len(non_crowd)


def expect_root_error(check, root, fix):
    with pytest.raises(DataError) as error:
        check(str(root))
    message = str(error.value)
    assert message.startswith("data.root: ") and fix in message and "\n" not in message, message


def test_check_coco_errors_are_one_line(coco, tmp_path):
    check_coco(str(coco))

    def expect(root, fix):
        expect_root_error(check_coco, root, fix)

    expect(tmp_path / "missing", "does not exist")
    broken = tmp_path / "broken"
    (broken / "train2017").mkdir(parents=True)
    expect(broken, "no annotations/instances_train2017.json")
    (broken / "annotations").mkdir()
    (broken / "annotations" / "instances_train2017.json").write_text(json.dumps({"images": [], "annotations": []}))
    expect(broken, "no 'categories' list")
    (broken / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": []}))
    expect(broken, "no val2017/ image directory")


# ---------------------------------------------------------------- ADE20K

def write_ade(root: Path, labels: list[np.ndarray]) -> Path:
    """The same label maps (colour = value) in both splits."""
    for split in ("training", "validation"):
        for kind in ("images", "annotations"):
            (root / kind / split).mkdir(parents=True)
        for i, label in enumerate(labels):
            Image.fromarray(np.stack([label * 40] * 3, -1).astype(np.uint8)).save(root / "images" / split / f"{i}.jpg")
            Image.fromarray(label.astype(np.uint8)).save(root / "annotations" / split / f"{i}.png")
    return root


def test_reduce_zero_label():
    label = np.array([[0, 1, 150], [2, 75, 0]], dtype=np.uint8)
    reduced = reduce_zero_label(label)
    assert reduced.dtype == np.uint8 and reduced.tolist() == [[255, 0, 149], [1, 74, 255]]


def test_ade20k_labels_are_reduced_exactly_once(ade):
    train, val = ADE20K(str(ade), "train", S, train=True, **ADE), ADE20K(str(ade), "val", S, train=False, **ADE)
    assert len(train.classes) == 150 and train.classes[:3] == ["wall", "building", "sky"]
    assert len(train) == 8 and len(val) == 3
    for i in range(len(val)):
        png = np.array(Image.open(ade / "annotations" / "validation" / f"ADE_val_{i + 1:08d}.png"))
        image, label = val.load(i, random.Random(0))
        assert label.dtype == torch.int64 and label.tolist() == reduce_zero_label(png).tolist()
    seen = set()
    for i in range(len(train)):
        for seed in range(3):
            image, label = train.load(i, random.Random(seed))
            assert image.shape == (3, S, S) and image.dtype == torch.float32
            assert label.shape == (S, S) and label.dtype == torch.int64
            seen |= set(label.unique().tolist())
    assert seen <= {0, 1, 2, 4, 255} and {0, 4, 255} <= seen  # PNG values {0, 1, 2, 3, 5}, reduced once


def test_ade20k_label_above_the_classes_is_an_unreadable_sample(tmp_path):
    """A value past 150 (another release, or a colour-coded map) would be a class past the head: a
    device assert in the loss on GPU. It is rejected as the sample's error, which is skipped and counted."""
    root = make_ade20k(tmp_path / "ade", n_train=2, n_val=1)
    source = ADE20K(str(root), "train", 64, train=True, **ADE)
    png = root / "annotations" / "training" / f"{source.stems[0]}.png"
    label = np.array(Image.open(png))
    label[0, 0] = 200
    Image.fromarray(label).save(png)
    with pytest.raises(ValueError, match="holds label 200, above ADE20K's 150 classes"):
        source.read_label(0)
    source.read_label(1)  # the others still read


def test_ade20k_eval_image_size_follows_the_keep_ratio_rule(ade):
    val = ADE20K(str(ade), "val", S, train=False, **ADE)
    for i in range(len(val)):
        image, label = val.load(i, random.Random(0))
        height, width = label.shape
        assert image.shape[0] == 3 and min(image.shape[1:]) == 512  # short side 512, never padded
        assert image.shape[1:] == keep_ratio_size(width, height, (2048, 512))[::-1]
    assert keep_ratio_size(3000, 100, (2048, 512)) == (2048, 68)  # the long side caps it


def test_ade20k_train_crop_is_padded_with_zero_and_ignore(ade):
    ds = ADE20K(str(ade), "train", S, train=True, **{**ADE, "scale": (128, 32), "ratio_range": (1, 1)})
    for i in range(len(ds)):
        png = Image.open(ade / "annotations" / "training" / f"ADE_train_{i + 1:08d}.png")
        new_w, new_h = keep_ratio_size(*png.size, (128, 32))
        resized = reduce_zero_label(np.array(png.resize((new_w, new_h), Image.NEAREST)))
        image, label = ds.load(i, random.Random(i))
        assert (label[new_h:] == 255).all() and (label[:, new_w:] == 255).all()
        assert (image[:, new_h:] == 0).all() and (image[:, :, new_w:] == 0).all()
        content = label[:new_h, :new_w].numpy()
        assert (content == resized).all() or (content == resized[:, ::-1]).all()  # maybe flipped


def test_ade20k_cat_max_ratio_redraws_dominated_crops(tmp_path):
    halves = np.ones((64, 128), dtype=np.uint8)
    halves[:, 64:] = 2
    root = write_ade(tmp_path / "ADEChallengeData2016", [halves])

    def worst_share(cat_max_ratio: float) -> np.ndarray:
        ds = ADE20K(str(root), "train", 64, train=True,
                    **{**ADE, "scale": (128, 64), "ratio_range": (1, 1), "cat_max_ratio": cat_max_ratio})
        shares = []
        for seed in range(40):
            _, label = ds.load(0, random.Random(seed))
            counts = np.bincount(label[label != 255].numpy())
            shares.append(counts.max() / counts.sum())
        return np.array(shares)

    assert (worst_share(1.0) >= 0.75).mean() > 0.3  # about half the random crops are dominated
    assert (worst_share(0.75) < 0.75).all()


def test_ade20k_layout_errors(ade, tmp_path):
    check_ade20k(str(ade))

    def expect(root, fix):
        expect_root_error(check_ade20k, root, fix)

    expect(tmp_path / "missing", "does not exist")
    expect(ade.parent, "point data.root at that directory")
    root = write_ade(tmp_path / "ADEChallengeData2016", [np.ones((8, 8))])
    (root / "images" / "validation" / "0.jpg").unlink()
    expect(root, "images/validation has no .jpg images")
    (root / "annotations" / "validation" / "0.png").rename(root / "annotations" / "validation" / "x.png")
    (root / "images" / "validation" / "x.jpg").write_bytes((root / "images" / "training" / "0.jpg").read_bytes())
    (root / "images" / "validation" / "y.jpg").write_bytes((root / "images" / "training" / "0.jpg").read_bytes())
    with pytest.raises(DataError, match="data.root: 1 files in .*validation have no counterpart .* \\(e.g. y\\)"):
        ADE20K(str(root), "val", 8, train=False, **ADE)
    shutil.rmtree(root / "annotations" / "training")
    expect(root, "no annotations/training/ directory")


# ---------------------------------------------------------------- config dispatch and batching

def test_build_source_and_check_data_dispatch(coco, ade):
    config = {**COCO_CFG, "root": str(coco), "scale_range": [0.5, 1.5]}
    check_data(config)
    train, val = build_source(config, "train"), build_source(config, "val")
    assert isinstance(train, CocoDetection) and train.train and not val.train
    assert train.ann_file.name == "instances_train2017.json" and val.ann_file.name == "instances_val2017.json"
    assert train.scale_range == (0.5, 1.5) and train.size == S

    config = {**ADE_CFG, "root": str(ade), "ratio_range": [1, 1], "cat_max_ratio": 1}
    check_data(config)
    train, val = build_source(config, "train"), build_source(config, "val")
    assert isinstance(train, ADE20K) and train.train and not val.train
    assert train.stems[0].startswith("ADE_train_") and val.stems[0].startswith("ADE_val_")
    assert train.ratio_range == (1, 1) and train.cat_max_ratio == 1 and train.size == S

    def expect(config, key, fix):
        with pytest.raises(DataError) as error:
            check_data(config)
        message = str(error.value)
        assert message.startswith(key) and fix in message and "\n" not in message, message

    expect({**COCO_CFG, "root": str(coco), "img_size": None}, "data.img_size ", "not set")
    expect({**ADE_CFG, "root": None}, "data.root ", "not set")
    expect({**COCO_CFG, "root": str(ade)}, "data.root: ", "point data.root at the COCO root")
    expect({**ADE_CFG, "root": str(coco)}, "data.root: ", "no images/training/")
    expect({**COCO_CFG, "root": str(coco), "scale_range": [2, 1]}, "data.scale_range: ", "low")
    expect({**ADE_CFG, "root": str(ade), "ratio_range": 2}, "data.ratio_range: ", "[low")
    expect({**ADE_CFG, "root": str(ade), "cat_max_ratio": 0}, "data.cat_max_ratio: ", "(0, 1]")
    expect({k: v for k, v in ADE_CFG.items() if k != "resize"}, "data.resize ", "is missing")


def test_batches_stack_equal_shapes_and_list_the_rest(coco, ade):
    loader = build_loader(CocoDetection(str(coco), "train", S, train=True, **COCO), global_batch=4, micro_batch=2,
                          rank=0, world_size=1, seed=0, start=DataPosition())
    images, targets, bad, first_bad = next(iter(loader))
    assert images.shape == (2, 3, S, S) and len(targets) == 2 and set(targets[0]) >= {"boxes", "labels"}
    assert bad == 0 and first_bad == ""

    val = SeededSamples(ADE20K(str(ade), "val", S, train=False, **ADE), seed=0)
    images, labels, _, _ = collate_samples([val[(0, 0)], val[(0, 1)]])
    assert isinstance(images, list) and isinstance(labels, list) and labels[0].shape != labels[1].shape
    train = SeededSamples(ADE20K(str(ade), "train", S, train=True, **ADE), seed=0)
    images, labels, _, _ = collate_samples([train[(0, 0)], train[(0, 1)]])
    assert images.shape == (2, 3, S, S) and labels.shape == (2, S, S) and labels.dtype == torch.int64
    _, labels, _, _ = collate_samples([(torch.zeros(3), np.int64(2), 0, ""), (torch.zeros(3), 5, 1, "x")])
    assert labels.tolist() == [2, 5] and labels.dtype == torch.int64
