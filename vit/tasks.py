"""What differs between pretraining, COCO detection and ADE20K segmentation, behind one interface.

The training loop (vit/train.py) is the same for all three; a task supplies the model, the loss of
a micro-batch, what to shard and at which learning-rate scale, and the evaluation:

  classification   ViT + linear head on the class token; top-1/top-5          (jobs/pretrain.py)
  coco             ViTDet: windowed trunk, simple pyramid, Mask R-CNN; box and mask AP by COCOeval
  ade20k           trunk at 4 depths, pyramid, UperNet + FCN aux; dataset-level mIoU
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from vit.checkpoint import load_pretrained, resolve_checkpoint
from vit.data.ade20k import IGNORE_INDEX
from vit.data.loader import SeededSamples, WorkerSafeLoader, collate_samples
from vit.data.sources import build_source
from vit.distributed import World, all_reduce_max, all_reduce_sum, broadcast_object
from vit.errors import CheckpointError
from vit.model import VARIANTS, build_model, train_flops_per_image
from vit.run_dir import eval_dir


class EvalSplit:
    """This rank's share of a whole split as (images, targets, keep) batches. Every rank runs the same
    number of batches (FSDP's all-gathers are collectives): the last ones are padded with sample 0,
    and `keep` masks the padding out.

    An unreadable image is masked out too and counted (`unreadable()`): training replaces it with a
    stand-in, but here the stand-in would be scored twice, once under each image's name.
    """

    def __init__(self, source, world: World, batch: int, num_workers: int):
        self.source, self.world, self.batch, self.num_workers = source, world, batch, num_workers
        self.skipped = 0

    def __iter__(self):
        world, batch = self.world, self.batch
        per_rank = -(-len(self.source) // world.world_size)
        indices = list(range(world.rank, len(self.source), world.world_size))
        keep = [True] * len(indices) + [False] * (per_rank - len(indices))
        indices += [0] * (per_rank - len(indices))
        loader = WorkerSafeLoader(SeededSamples(self.source, seed=0), num_workers=self.num_workers,
                                  batch_sampler=[[(0, i) for i in indices[j:j + batch]]
                                                 for j in range(0, per_rank, batch)],
                                  collate_fn=collate_eval, pin_memory=world.device.type == "cuda",
                                  # its own seed source: the global RNG (drop path) must not
                                  # move, or a resume after an evaluation is not exact
                                  generator=torch.Generator())
        for j, (images, targets, failures) in enumerate(loader):
            batch_keep = keep[j * batch: j * batch + len(failures)]
            for k, failure in zip(batch_keep, failures):
                if k and failure:
                    self.skipped += 1
                    print(f"[rank {world.rank}] evaluation skips an unreadable image: {failure}", flush=True)
            yield images, targets, [k and not failure for k, failure in zip(batch_keep, failures)]

    def unreadable(self) -> int:
        """Images skipped on all ranks (a collective: every rank calls it)."""
        return int(all_reduce_sum(torch.tensor(float(self.skipped), device=self.world.device)).item())


def collate_eval(items):
    """(images, targets, per item: "" or why it was replaced by a stand-in)."""
    images, targets, _, _ = collate_samples(items)
    return images, targets, [first_bad if bad else "" for _, _, bad, first_bad in items]


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup: float,
              cutmix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of the micro-batch with itself reversed,
    one of them per micro-batch when both are on, as timm's Mixup: the images and their class
    probabilities. `mixup` and `cutmix` are the Beta(alpha, alpha) parameters of the mixing ratio.
    It draws from the rank's torch RNG, which checkpoints save, so a resume mixes the same way."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(()).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = torch.distributions.Beta(alpha, alpha).sample().item()
    other = images.flip(0)
    if use_cutmix:  # a box of 1 - lam of the area, clipped at the borders; lam is what stays
        height, width = images.shape[-2:]
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        cy, cx = torch.randint(height, ()).item(), torch.randint(width, ()).item()
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        images = images.clone()
        images[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        images = images * lam + other * (1 - lam)
    targets = F.one_hot(labels, num_classes).float()
    return images, targets * lam + targets.flip(0) * (1 - lam)


def spread_blocks(depth: int, count: int = 4) -> list[int]:
    """Evenly spaced block indices ending at the last: 7, 15, 23, 31 for ViT-H (ViTDet, the issue)."""
    return [depth * (k + 1) // count - 1 for k in range(count)]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "softmax",
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over the micro-batch; `labels` are class indices or (mixed) class probabilities.
    Sigmoid: per-class binary cross-entropy summed over classes, as big_vision."""
    logits = logits.float()
    if kind == "softmax":
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    targets = F.one_hot(labels, logits.shape[-1]).float() if labels.dtype == torch.long else labels
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / logits.shape[-1]
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]


class Task:
    name = "classification"
    bf16_root = True  # see vit.parallel.shard_model

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def source(self, split: str, cache_dir: str):
        return build_source(self.cfg.data, split, cache_dir=cache_dir)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def lr_scale(self, model: nn.Module) -> dict[str, float] | None:
        return None

    def head_flops_per_image(self, num_classes: int) -> float:
        """The part of `flops_per_image` spent after the trunk (the planner states its share)."""
        return 0.0


class Classification(Task):
    def build_model(self, num_classes: int) -> nn.Module:
        cfg = self.cfg
        return build_model(cfg.model.name, num_classes, img_size=cfg.data.img_size,
                           drop_path_rate=cfg.model.drop_path_rate, dropout_rate=cfg.model.get("dropout_rate", 0.0),
                           grad_checkpointing=cfg.model.grad_checkpointing,
                           sigmoid_head=cfg.train.loss == "sigmoid")

    def flops_per_image(self, num_classes: int) -> float:
        return train_flops_per_image(self.cfg.model.name, num_classes, self.cfg.data.img_size)

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.cfg.train
        if t.get("mixup") or t.get("cutmix"):
            images, labels = mix_batch(images, labels, model.num_classes, t.get("mixup") or 0, t.get("cutmix") or 0)
        return classification_loss(model(images), labels, t.loss, t.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, source, world: World) -> dict:
        """Top-1/top-5 over the whole val split."""
        counts = torch.zeros(3, device=world.device)  # top-1 hits, top-5 hits, samples
        split = EvalSplit(source, world, self.cfg.train.micro_batch, self.cfg.data.num_workers)
        for images, labels, keep in split:
            mask = torch.tensor(keep, device=world.device)
            top5 = model(images.to(world.device)).topk(min(5, model.num_classes), dim=-1).indices
            hits = top5 == labels.to(world.device)[:, None]
            counts += torch.stack([(hits[:, 0] & mask).sum(), (hits.any(-1) & mask).sum(), mask.sum()]).float()
        counts = all_reduce_sum(counts)
        return {"val_top1": (counts[0] / counts[2]).item(), "val_top5": (counts[1] / counts[2]).item(),
                "unreadable": split.unreadable()}


class DenseTask(Task):
    """A pretrained ViT trunk under a dense-prediction head, trained with layer-wise LR decay."""
    bf16_root = False
    trunk_prefix = ""

    def trunk_args(self, out_blocks) -> dict:
        cfg, variant = self.cfg, VARIANTS[self.cfg.model.name]
        return dict(variant=variant, img_size=cfg.data.img_size, patch_size=cfg.task.patch_size,
                    window_size=cfg.task.get("window_size", 0), global_blocks=self.global_blocks(),
                    out_blocks=out_blocks, drop_path_rate=cfg.model.drop_path_rate,
                    use_rel_pos=cfg.task.get("use_rel_pos", False))

    def global_blocks(self) -> list[int]:
        if not self.cfg.task.get("window_size"):
            return []
        return list(self.cfg.task.get("global_blocks") or spread_blocks(VARIANTS[self.cfg.model.name].depth))

    def build_trunk(self, out_blocks) -> nn.Module:
        from vit.dense import DenseViT

        trunk = DenseViT(**self.trunk_args(out_blocks))
        trunk.set_grad_checkpointing(self.cfg.model.grad_checkpointing)
        return trunk

    def load_pretrained(self, model: nn.Module) -> str:
        """Overwrite the (sharded) model's trunk with `pretrained`; returns the file or step-N checkpoint
        it came from. Rank 0 alone reads and adapts the weights; the other ranks receive just their
        shards from it. The loop calls this only when no checkpoint of the run could be loaded: a
        resumed run's own weights supersede these."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        trunk, state, error, source = self.trunk_of(model), {}, None, str(self.cfg.pretrained)
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                # A pretraining run dir means its newest checkpoint *now*: named, so that the journal
                # says which weights this run started from while that run goes on saving.
                source = source if Path(source).is_file() else str(resolve_checkpoint(source))
                state = trunk.adapt_pretrained(load_pretrained(source))
            except ValueError as e:
                error = (f"pretrained: {self.cfg.pretrained} does not fit {self.cfg.model.name} ({e}); "
                         "use a checkpoint of the same model")
            except CheckpointError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 (a damaged directory fails in DCP in any way; never hang the peers)
                error = f"pretrained: {self.cfg.pretrained} could not be read ({type(e).__name__}: {e})"
        error, source = broadcast_object((error, source))  # every rank fails alike, not waiting for rank 0's tensors
        if error:
            raise CheckpointError(error)
        set_model_state_dict(trunk, state, options=StateDictOptions(full_state_dict=True,
                                                                   broadcast_from_rank0=dist.is_initialized()))
        return source

    def trunk_of(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.trunk_prefix.rstrip("."))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(self.trunk_of(model).blocks)

    def lr_scale(self, model: nn.Module) -> dict[str, float]:
        from vit.dense import layer_decay_scales

        return layer_decay_scales(model, self.trunk_prefix, VARIANTS[self.cfg.model.name].depth,
                                  self.cfg.task.layer_decay)

    def flops_per_image(self, num_classes: int) -> float:
        """The trunk's and what `head_flops_per_image` counts (ADE20K's UperNet: nothing yet, so its
        MFU is a lower bound)."""
        from vit.dense import dense_flops_per_image

        a = self.trunk_args(None)
        return dense_flops_per_image(a["variant"], a["img_size"], a["patch_size"], a["window_size"],
                                     a["global_blocks"], a["use_rel_pos"]) + self.head_flops_per_image(num_classes)


class CocoDetection(DenseTask):
    name = "coco"
    trunk_prefix = "backbone.trunk."

    def build_model(self, num_classes: int) -> nn.Module:
        from vit.detection import build_detector

        t = self.cfg.task
        return build_detector(self.build_trunk((-1,)), num_classes + 1, self.cfg.data.img_size,
                              fpn_channels=t.fpn_channels, representation_size=t.representation_size,
                              box_detections_per_img=t.detections_per_image,
                              box_batch_size_per_image=t.roi_batch, masks=t.masks)

    def head_flops_per_image(self, num_classes: int) -> float:
        from vit.detection import head_flops_per_image

        t = self.cfg.task
        return head_flops_per_image(VARIANTS[self.cfg.model.name].embed_dim, self.cfg.data.img_size, num_classes + 1,
                                    t.fpn_channels, t.representation_size, t.roi_batch, t.masks)

    def loss(self, model: nn.Module, images: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        device = images.device
        sizes = [t["image_size"] for t in targets]
        keys = ("boxes", "labels", "masks") if self.cfg.task.masks else ("boxes", "labels")
        targets = [{k: t[k].to(device) for k in keys} for t in targets]
        return sum(model(images, sizes, targets).values())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, source, world: World) -> dict:
        """Box AP (and mask AP) by the real COCOeval on the detections of all ranks, gathered to rank 0."""
        from vit.detection import paste_masks

        boxes_found, masks_found, image_ids = [], [], []
        split = EvalSplit(source, world, self.cfg.train.micro_batch, self.cfg.data.num_workers)
        for images, targets, keep in split:
            outputs = model(images.to(world.device), [t["image_size"] for t in targets])
            for out, target, k in zip(outputs, targets, keep):
                if not k:
                    continue
                image_ids.append(target["image_id"])
                # Canvas -> original pixels, clipped again (as detectron2's detector_postprocess): the
                # model clipped to the resized image, which rounding may leave a pixel larger.
                boxes = out["boxes"].float().cpu() / target["scale"]
                width, height = target["size"]
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
                found = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
                common = [{"image_id": target["image_id"], "category_id": source.cat_ids[int(label) - 1],
                           "score": round(float(score), 4)}
                          for label, score in zip(out["labels"][found], out["scores"][found])]
                xywh = torch.cat([boxes[found, :2], boxes[found, 2:] - boxes[found, :2]], 1)
                boxes_found += [{**c, "bbox": [round(v, 2) for v in box]} for c, box in zip(common, xywh.tolist())]
                if "masks" in out:  # pasted at the original size, as detectron2 scores them
                    masks = paste_masks(out["masks"][found, 0].cpu(), boxes[found], height, width)
                    masks_found += [{**c, "segmentation": rle} for c, rle in zip(common, mask_rles(masks))]
        unreadable = split.unreadable()
        local = (boxes_found, masks_found, image_ids)
        gathered = [None] * world.world_size if world.world_size > 1 else [local]
        if world.world_size > 1:
            dist.all_gather_object(gathered, local)
        scores, error = {}, None
        if world.is_main:
            image_ids = [i for _, _, ids in gathered for i in ids]
            try:
                scores = coco_ap(source.ann_file, [d for part, _, _ in gathered for d in part], image_ids)
                if self.cfg.task.get("masks"):
                    scores.update(coco_ap(source.ann_file, [d for _, part, _ in gathered for d in part], image_ids,
                                          iou_type="segm"))
                scores["unreadable"] = unreadable
            except Exception as e:  # noqa: BLE001 (every rank must fail, or the others hang in the next step)
                error = f"COCO evaluation of {source.ann_file} failed ({type(e).__name__}: {e})"
        error = broadcast_object(error)
        if error:
            raise RuntimeError(error)
        return scores


def mask_rles(masks: torch.Tensor) -> list[dict]:
    """[N, H, W] booleans as COCO's compressed RLE, its counts as text so that the results are JSON."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8))) if len(masks) else []
    return [{"size": rle["size"], "counts": rle["counts"].decode()} for rle in rles]


@functools.lru_cache(maxsize=1)
def coco_ground_truth(ann_file: str):
    """pycocotools' index of the annotations, built once per run rather than at every evaluation
    (val2017's are 25 MB of JSON). COCOeval may reuse it: for masks it turns the polygons into RLE
    in place, which it reads again as they are."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO(ann_file)
    gt.dataset.setdefault("info", {})  # loadRes copies it; converted datasets often lack it
    return gt


def coco_ap(ann_file: str | Path, results: list[dict], image_ids: list[int] | None = None,
            iou_type: str = "bbox") -> dict:
    """COCOeval's AP over `image_ids` (default: every image of the annotations): AP, AP50, ... for
    boxes ("bbox" results), mask_AP, mask_AP50, ... for masks ("segm" results, RLE)."""
    from pycocotools.cocoeval import COCOeval

    prefix = "" if iou_type == "bbox" else "mask_"
    names = [prefix + k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
    gt = coco_ground_truth(str(ann_file))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; the loop logs the numbers
        if not results:
            return {**{k: 0.0 for k in names}, prefix + "detections": 0}
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where a size range has no ground truth; AP is in [0, 1], shown as %.
    return {**{k: max(float(v), 0.0) * 100 for k, v in zip(names, evaluator.stats)},
            prefix + "detections": len(results)}


class ADE20KSegmentation(DenseTask):
    name = "ade20k"
    trunk_prefix = "trunk."

    def build_model(self, num_classes: int) -> nn.Module:
        from vit.segmentation import Segmenter

        t = self.cfg.task
        out_blocks = list(t.get("out_blocks") or spread_blocks(VARIANTS[self.cfg.model.name].depth))
        return Segmenter(self.build_trunk(out_blocks), num_classes, channels=t.channels,
                         aux_channels=t.aux_channels, aux_weight=t.aux_weight, ignore_index=IGNORE_INDEX)

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model.loss(model(images), labels.to(images.device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, source, world: World) -> dict:
        """mIoU over the whole split: intersections and unions are summed per class over every image
        and rank, then divided. Sliding windows on the short-side-resized image; logits are resized
        to the original label."""
        from vit.segmentation import count_windows, intersect_and_union, slide_inference, summarize

        t, crop, k = self.cfg.task, self.cfg.data.img_size, len(source.classes)
        totals = torch.zeros(4, k, dtype=torch.float64, device=world.device)
        split = EvalSplit(source, world, 1, self.cfg.data.num_workers)
        for images, labels, keep in split:
            image, label = images[0], labels[0]
            batches = math.ceil(count_windows(*image.shape[-2:], crop, t.eval_stride) / t.eval_batch)
            calls = all_reduce_max([batches])[0]  # equal model calls on every rank
            logits = slide_inference(model, image.to(world.device), k, crop, t.eval_stride,
                                     batch=t.eval_batch, calls=calls)
            logits = F.interpolate(logits[None], size=label.shape[-2:], mode="bilinear", align_corners=False)
            if keep[0]:
                totals += intersect_and_union(logits[0].argmax(0), label.to(world.device), k,
                                              IGNORE_INDEX).to(totals)
        metrics = summarize(all_reduce_sum(totals).cpu())
        percent = lambda v: None if v is None else 100 * v  # noqa: E731  (as papers and COCO AP report)
        return {**{k: [percent(x) for x in v] if isinstance(v, list) else percent(v) for k, v in metrics.items()},
                "unreadable": split.unreadable()}


TASKS = {task.name: task for task in (Classification, CocoDetection, ADE20KSegmentation)}


def build_task(cfg: DictConfig) -> Task:
    return TASKS[cfg.get("task", {}).get("name", "classification")](cfg)


def write_evaluation(run_dir: Path, step: int, metrics: dict) -> Path:
    """`<run_dir>/eval/step-N.json` and `eval/latest.json`: the full result, per-class values included."""
    out = eval_dir(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"step": step, **metrics}, indent=1)
    (out / f"step-{step}.json").write_text(text)
    (out / "latest.json.tmp").write_text(text)
    (out / "latest.json.tmp").replace(out / "latest.json")
    return out / f"step-{step}.json"
