"""Fine-tuning end to end on tiny real-format datasets: COCO detection scored by the real COCOeval,
ADE20K segmentation scored by dataset-level mIoU, pretrained weights from DCP and safetensors, the
schedules and layer decay, and one-line errors for bad fine-tuning input."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import make_ade20k, make_coco
from helpers import ROOT, data_config, journaled, losses, recipe, run_job
from omegaconf import OmegaConf

from vit.config import validate_task
from vit.data.coco import segmentation_mask
from vit.engine.checkpoint import SafeReader, export_safetensors, load_pretrained
from vit.engine.optim import learning_rate, param_groups
from vit.errors import ConfigError
from vit.models.vit import resample_pos_embed
from vit.tasks import build_task
from vit.tasks.coco import coco_ap, mask_rles

# A tiny ViT trunk (vit_tiny_patch16 at 128 px: an 8 x 8 grid, windows of 4) under small heads.
TINY_COCO = [
    "task=coco", "model=vit_tiny_patch16", "data.img_size=128", "data.scale_range=[0.5,1.5]", "data.num_workers=0",
    "model.drop_path_rate=0", "model.grad_checkpointing=false", "task.window_size=4", "task.fpn_channels=32",
    "task.representation_size=128", "task.roi_batch=64", "train.global_batch=8", "train.micro_batch=8",
    "train.log_every=20", "train.progress=false", "train.grad_clip=1.0", "optim.lr=1e-3", "optim.warmup_steps=10",
    "checkpoint.every_steps=100", "checkpoint.every_minutes=null", "checkpoint.keep_every=null",
]
TINY_ADE = [
    "task=ade20k", "model=vit_tiny_patch16", "data.img_size=64", "data.resize=[64,256]", "data.num_workers=0", "model.drop_path_rate=0",
    "task.channels=64", "task.aux_channels=32", "task.eval_stride=43", "train.global_batch=8", "train.micro_batch=8",
    "train.log_every=20", "train.progress=false", "optim.lr=4e-3", "optim.warmup_steps=10",
    "checkpoint.every_steps=100", "checkpoint.every_minutes=null", "checkpoint.keep_every=null",
]


def finetune(run_dir: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return run_job(run_dir, *overrides, script="jobs/finetune.py", tiny=False, **kwargs)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco"), n_train=64, n_val=48, size=(96, 128))


@pytest.fixture(scope="module")
def ade(tmp_path_factory) -> Path:
    return make_ade20k(tmp_path_factory.mktemp("ade"), n_train=32, n_val=8)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A pretraining run of the tiny ViT at 32 px (its 2 x 2 position grid must be resampled)."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    run_job(run_dir, "train.steps=4")
    return run_dir


def test_detector_learns_and_cocoeval_scores_it(coco, tmp_path):
    run_dir = tmp_path / "coco"
    finetune(run_dir, *TINY_COCO, f"data.root={coco}", "train.steps=300", "train.eval_every=150", timeout=900)
    final = json.loads((run_dir / "eval" / "latest.json").read_text())
    assert final["step"] == 300 and (run_dir / "eval" / "step-150.json").exists()
    # Measured at step 300 (48 val images, ~80 objects): box AP 14.7, AP50 40.6; mask AP 20.2, AP50
    # 44.5. Predicting nothing scores 0, random boxes and masks under 0.2 AP50 (test below); so does
    # a broken box, mask, label or coordinate path.
    assert final["AP50"] > 20 and final["AP"] > 5, final
    assert final["mask_AP50"] > 20 and final["mask_AP"] > 5 and final["mask_detections"] == final["detections"], final
    assert [r["step"] for r in journaled(run_dir, "evaluation") if "AP" in r] == [150, 300]


def test_cocoeval_scores_the_ground_truth_100_every_time(coco):
    """The scoring path alone: ground-truth boxes as detections give AP 100, and still do at the
    next evaluation, which reuses the annotation index built at the first (after a mask evaluation,
    whose ground-truth masks, rasterised and RLE-encoded as evaluation does, score 100 too)."""
    ann_file = coco / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                  for a in data["annotations"] if not a.get("iscrowd", 0)]
    first = coco_ap(ann_file, detections)
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    rasterised = [torch.from_numpy(segmentation_mask(a["segmentation"], *sizes[a["image_id"]]))[None]
                  for a in data["annotations"] if not a.get("iscrowd", 0)]
    masks = [{**d, "segmentation": mask_rles(m)[0]} for d, m in zip(detections, rasterised)]
    assert coco_ap(ann_file, masks, iou_type="segm")["mask_AP"] == 100.0  # polygons -> masks -> RLE
    second = coco_ap(ann_file, detections)
    assert first["AP"] == first["AP50"] == second["AP"] == 100.0, (first, second)
    assert coco_ap(ann_file, detections[: len(detections) // 2])["AP"] < 100


def test_predicting_nothing_or_random_boxes_and_masks_scores_far_below_the_learning_threshold(coco):
    """What the detector test's thresholds (AP50 > 20, AP > 5, box and mask) must exclude: no
    detections, and 100 random boxes per image with random labels, filled as masks."""
    ann_file = coco / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    assert coco_ap(ann_file, [])["AP50"] == coco_ap(ann_file, [], iou_type="segm")["mask_AP50"] == 0
    rng = np.random.default_rng(0)
    boxes, masks = [], []
    for im in data["images"]:
        for _ in range(100):
            x, y = rng.uniform(0, im["width"] - 8), rng.uniform(0, im["height"] - 8)
            w, h = rng.uniform(8, im["width"] - x), rng.uniform(8, im["height"] - y)
            filled = torch.zeros(1, im["height"], im["width"], dtype=torch.bool)
            filled[0, round(y):round(y + h), round(x):round(x + w)] = True
            common = {"image_id": im["id"], "category_id": int(rng.choice([1, 3, 7])), "score": float(rng.uniform())}
            boxes.append({**common, "bbox": [x, y, w, h]})
            masks.append({**common, "segmentation": mask_rles(filled)[0]})
    box, mask = coco_ap(ann_file, boxes), coco_ap(ann_file, masks, iou_type="segm")
    # Measured: AP50 0.18 and 0.15, AP 0.03 and 0.02 (boxes, masks).
    assert box["AP50"] < 2 and box["AP"] < 1 and mask["mask_AP50"] < 2 and mask["mask_AP"] < 1, (box, mask)


class GroundTruthDetector(torch.nn.Module):
    """Answers each eval canvas with its image's annotated boxes (recognised by its pixels), plus a
    low-scored box over the whole canvas, padding included."""

    def __init__(self, source):
        super().__init__()
        self.answers = {}
        for i in range(len(source)):
            image, target = source.load(i, random.Random(0))
            self.answers[image.numpy().tobytes()] = target

    def forward(self, images, image_sizes):
        outputs = []
        for image in images:
            t = self.answers[image.numpy().tobytes()]
            canvas = torch.tensor([[0.0, 0.0, image.shape[-1], image.shape[-2]]])
            outputs.append({"boxes": torch.cat([t["boxes"], canvas]), "labels": torch.cat([t["labels"], torch.ones(1, dtype=torch.long)]),
                            "scores": torch.cat([torch.ones(len(t["boxes"])), torch.full((1,), 0.01)])})
        return outputs


def test_coco_evaluation_skips_an_unreadable_image_once_and_clips_boxes_to_the_image(tmp_path, monkeypatch):
    """An unreadable val image is left out of the score and counted. Training's replacement (the
    next image) must not be scored a second time, as a duplicate set of detections. Boxes in the
    canvas's padding are clipped to the image."""
    import vit.tasks.coco
    from vit.data.sources import build_source
    from vit.engine.distributed import World

    root = make_coco(tmp_path / "coco", n_train=2, n_val=6)
    source = build_source(data_config("coco", root=str(root), img_size=128), "val")
    model = GroundTruthDetector(source)
    broken = root / "val2017" / source.files[source.image_ids[2]]
    broken.write_bytes(broken.read_bytes()[:200])
    scored = []
    monkeypatch.setattr(vit.tasks.coco, "coco_ap", lambda *a: scored.append(a) or coco_ap(*a))
    task = build_task(recipe("task=coco", "task.masks=false", "train.micro_batch=4", "data.num_workers=0",
                             config="finetune"))
    metrics = task.evaluate(model, source, World(0, 1, 0, torch.device("cpu"), None))

    assert metrics["unreadable"] == 1 and metrics["AP"] == 100.0, metrics
    _, detections, image_ids = scored[0]
    assert sorted(image_ids) == sorted(set(source.image_ids) - {source.image_ids[2]})
    sizes = {im["id"]: (im["width"], im["height"]) for im in json.loads(source.ann_file.read_text())["images"]}
    assert len({(d["image_id"], tuple(d["bbox"])) for d in detections}) == len(detections)  # none twice
    whole = [d for d in detections if d["score"] < 0.5]
    assert len(whole) == 5 and all(d["bbox"] == [0, 0, *sizes[d["image_id"]]] for d in whole)


def test_a_coco_scoring_failure_fails_every_rank(tmp_path):
    from dist_workers import coco_scoring_failure_fails_every_rank, spawn

    root = make_coco(tmp_path / "coco", n_train=2, n_val=4)
    spawn(coco_scoring_failure_fails_every_rank, 2, str(root), str(tmp_path))
    assert (tmp_path / "raised-0").exists() and (tmp_path / "raised-1").exists()


def test_coco_val_categories_must_be_the_train_categories(tmp_path):
    """A label is an index into the train categories; scoring maps it through the val ones."""
    root = make_coco(tmp_path / "coco", n_train=16, n_val=4)
    ann = root / "annotations" / "instances_val2017.json"
    data = json.loads(ann.read_text())
    dropped = data["categories"].pop()["id"]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != dropped]
    ann.write_text(json.dumps(data))
    proc = finetune(tmp_path / "run", *TINY_COCO, f"data.root={root}", "train.steps=20", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.root: the val split has"), proc.stderr


def test_coco_without_pycocotools_is_rejected_before_anything_runs(coco, monkeypatch):
    from vit.config import validate
    from vit.errors import ConfigError

    cfg = recipe("task=coco", f"data.root={coco}", config="finetune")
    validate(cfg, 1)
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # how an interpreter without it looks to find_spec
    with pytest.raises(ConfigError, match=r"^task: task=coco scores with pycocotools, which is not installed"):
        validate(cfg, 1)


def test_segmenter_learns_and_reports_dataset_level_miou(ade, tmp_path):
    run_dir = tmp_path / "ade"
    finetune(run_dir, *TINY_ADE, f"data.root={ade}", "train.steps=150", "train.eval_every=150", timeout=600)
    final = json.loads((run_dir / "eval" / "latest.json").read_text())
    ious = final["per_class_iou"]
    assert len(ious) == 150 and final["step"] == 150
    present = [v for v in ious if v is not None]
    assert final["mIoU"] == pytest.approx(sum(present) / len(present), rel=1e-6)  # the classes that occur
    # Measured: mIoU 68, aAcc 84 at step 150; predicting the most frequent class everywhere scores ~6 and ~22.
    assert final["mIoU"] > 30 and final["aAcc"] > 60, final


@pytest.mark.parametrize("form", ["dcp", "safetensors"])
def test_pretrained_trunk_loads_from_dcp_and_safetensors(pretrained, tmp_path, form):
    source = pretrained if form == "dcp" else export_safetensors(pretrained, tmp_path / "vit.safetensors")
    reference = load_pretrained(pretrained)  # the consolidated DCP state
    cfg = OmegaConf.load(ROOT / "conf" / "task" / "coco.yaml")
    cfg = OmegaConf.merge({"model": {"name": "vit_tiny_patch16", "drop_path_rate": 0.0, "grad_checkpointing": False},
                           "data": {"img_size": 128}, "task": {}, "pretrained": str(source)},
                          {k: cfg[k] for k in ("task",)}, {"task": {"window_size": 4}})
    task = build_task(cfg)
    model = task.build_model(num_classes=3)
    # A run directory is resolved to the checkpoint it names now, and reported.
    assert task.load_pretrained(model) == str(source if form == "safetensors" else pretrained / "checkpoints" / "step-4")
    trunk = model.backbone.trunk.state_dict()
    for name in ("blocks.0.attn.qkv.weight", "blocks.11.mlp.fc2.bias", "patch_embed.proj.weight"):
        assert torch.equal(trunk[name], reference[name]), name
    # The class entry is dropped and the 2 x 2 pretraining grid resampled to 8 x 8.
    assert trunk["pos_embed"].shape == (1, 64, 192)
    assert torch.allclose(trunk["pos_embed"], resample_pos_embed(reference["pos_embed"], (8, 8))[:, 1:])
    fresh = build_task(OmegaConf.merge(cfg, {"pretrained": None})).build_model(num_classes=3)
    assert not torch.equal(fresh.backbone.trunk.state_dict()["blocks.0.attn.qkv.weight"], reference["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("task", ["coco", "ade"])
def test_finetune_starts_from_pretrained_and_resumes_exactly(request, pretrained, tmp_path, task):
    run_dir = tmp_path / "resume"
    tiny = TINY_COCO if task == "coco" else TINY_ADE
    common = [*tiny, f"data.root={request.getfixturevalue(task)}", f"pretrained={pretrained}", "train.steps=8",
              "train.eval_every=0", "optim.warmup_steps=2", "checkpoint.every_steps=4", "train.log_every=1"]
    first = finetune(run_dir, *common, "train.stop_after_steps=4")
    assert "stop requested (step_limit)" in first.stdout, first.stdout
    second = finetune(run_dir, *common)
    assert f"resumed from {run_dir}/checkpoints/step-4" in second.stdout, second.stdout
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "completed" and status["step"] == 8
    straight = tmp_path / "straight"  # the same 8 steps without a stop: RNG, data and optimizer resume exactly
    finetune(straight, *common)
    assert losses(run_dir) == losses(straight)
    if task == "coco":  # ViTDet's relative positions and mask head, and their AdamW moments, are saved
        saved = SafeReader(str(run_dir / "checkpoints" / "step-4")).read_metadata().state_dict_metadata
        for name in ("backbone.trunk.blocks.0.attn.rel_pos_h", "roi_heads.mask_head.0.1.weight"):
            assert {k for k in saved if name in k} >= {f"model.{name}", f"optim.state.{name}.exp_avg"}, \
                sorted(saved)[:20]


def test_a_fine_tune_whose_checkpoints_all_fail_to_load_stops_and_keeps_them(pretrained, ade, tmp_path):
    """The run's only checkpoint passes the size check but fails part-way through loading, on 2 ranks.
    The run must not fall back to the pretrained weights (that would throw its training away): it
    stops in one line, not requeued, with the damaged checkpoint set aside, byte for byte."""
    common = [*TINY_ADE, f"data.root={ade}", f"pretrained={pretrained}", "train.steps=4", "train.micro_batch=4",
              "train.eval_every=0", "optim.warmup_steps=2", "checkpoint.every_steps=2", "train.log_every=1"]
    run_dir = tmp_path / "run"
    first = finetune(run_dir, *common, "train.stop_after_steps=2", nproc=2)
    assert f"fresh start from pretrained weights {pretrained}/checkpoints/step-4\n" in first.stdout, first.stdout
    shards = sorted((run_dir / "checkpoints/step-2").glob("*.distcp"))
    assert shards
    for shard in shards:  # keep the first half: loading writes some weights, then fails
        data = shard.read_bytes()
        shard.write_bytes(data[:len(data) // 2] + bytes(len(data) - len(data) // 2))
    damaged = {s.name: s.read_bytes() for s in shards}
    second = finetune(run_dir, *common, nproc=2, check=False)
    assert second.returncode != 0, second.stderr[-3000:]
    assert "fresh start" not in second.stdout and "resumed from" not in second.stdout, second.stdout
    aside = list((run_dir / "checkpoints").glob("step-2.damaged-*"))
    assert len(aside) == 1 and not (run_dir / "checkpoints/step-2").exists()
    assert {name: (aside[0] / name).read_bytes() for name in damaged} == damaged
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(set(errors)) == 1 and errors[0].startswith(
        f"error: no checkpoint of {run_dir} loads, and it never starts again from step 0 on its own; set aside in "
        f"{run_dir}/checkpoints: {aside[0].name} (failed to load ("), errors


def test_pretrained_is_for_fine_tuning_only():
    cfg = recipe("model=vit_tiny_patch16", "data.img_size=32", f"pretrained={ROOT}")
    with pytest.raises(ConfigError, match="pretrained: pretraining .* starts from scratch"):
        validate_task(cfg)


def test_schedules_and_layer_decay():
    step = OmegaConf.create({"lr": 1e-4, "warmup_steps": 10, "schedule": "step", "milestones": [0.5, 0.75], "gamma": 0.1})
    assert learning_rate(0, step, 100) == pytest.approx(1e-5)
    assert [learning_rate(s, step, 100) for s in (10, 49, 50, 74, 75, 99)] == pytest.approx(
        [1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6])
    # ViTDet-H's 75 epochs as configured: x 0.1 at exactly steps 122,916 and 133,159 of 138,281.
    coco = OmegaConf.load(ROOT / "conf" / "task" / "coco.yaml")
    assert coco.train.steps == 138281
    assert [learning_rate(s, coco.optim, 138281) / 1e-4 for s in (122915, 122916, 133158, 133159, 138280)] == \
        pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    hundred = OmegaConf.merge(coco.optim, {"milestones": [0.888889492, 0.962961356]})  # B and L, as the comment says
    assert [learning_rate(s, hundred, 184375) / 1e-4 for s in (163888, 163889, 177545, 177546)] == \
        pytest.approx([1, 0.1, 0.1, 0.01])
    poly = OmegaConf.create({"lr": 1e-4, "warmup_steps": 10, "schedule": "poly", "power": 1.0})
    assert learning_rate(9, poly, 110) == pytest.approx(1e-4)
    assert learning_rate(60, poly, 110) == pytest.approx(0.5e-4)
    cfg = recipe("task=ade20k", "model=vit_tiny_patch16", "model.drop_path_rate=0", "model.grad_checkpointing=false",
                 "data.img_size=64", "task.layer_decay=0.5", "task.channels=32", "task.aux_channels=16",
                 config="finetune")
    task = build_task(cfg)
    scales = task.lr_scale(task.build_model(150))
    assert scales["trunk.pos_embed"] == scales["trunk.patch_embed.proj.weight"] == 0.5 ** 13
    assert scales["trunk.blocks.0.attn.qkv.weight"] == 0.5 ** 12
    assert scales["trunk.blocks.11.mlp.fc1.weight"] == 0.5
    assert {v for k, v in scales.items() if not k.startswith("trunk.")} == {1.0}
    model = task.build_model(150)
    decayed = lambda groups: {n for g in groups if g["weight_decay"] for n in g["names"]}  # noqa: E731
    assert "trunk.pos_embed" not in decayed(param_groups(model, 0.1))
    assert decayed(param_groups(model, 0.1, decay_all=True)) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("overrides, message", [
    (["pretrained=/nonexistent/run"], "pretrained: /nonexistent/run does not exist"),
    (["task.global_blocks=[2,40]"], "task.global_blocks: [40] are outside the 12 blocks"),
    (["data.img_size=112"], "data.img_size: 112 is not a multiple of 32"),
    (["data.root=/nonexistent/coco"], "data.root"),
    (["optim.schedule=linear"], "optim.schedule: unknown schedule 'linear'"),
])
def test_bad_finetune_input_fails_early_in_one_line(coco, tmp_path, overrides, message):
    args = [*TINY_COCO, f"data.root={coco}", "train.steps=4", *overrides]
    proc = finetune(tmp_path / "bad", *args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_finetune_plan_counts_the_trunk(tmp_path):
    proc = subprocess.run([sys.executable, "jobs/plan.py", "--config-name", "finetune", "task=coco", "cluster=sg_h100",
                           f"run_dir={tmp_path / 'plan'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    flops = float(proc.stdout.split("parameters, ")[1].split(" GFLOPs")[0].replace(",", ""))
    assert 10_000 < flops < 30_000 and math.isfinite(flops), proc.stdout  # ViT-H at 1024 px, windowed
    share = float(proc.stdout.split("GFLOPs of them (")[1].split("%")[0])
    assert 5 < share < 20, proc.stdout  # pyramid, RPN, box and mask heads next to ViT-H
