"""COCO detection and instance segmentation (ViTDet: windowed trunk, simple pyramid, Mask R-CNN),
scored by the real COCOeval for boxes and masks."""
from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vit.engine.distributed import World, broadcast_object
from vit.models.vit import VARIANTS
from vit.tasks.base import DenseTask, EvalSplit


class CocoDetection(DenseTask):
    name = "coco"
    trunk_prefix = "backbone.trunk."

    def build_model(self, num_classes: int) -> nn.Module:
        from vit.models.detection import build_detector

        t = self.cfg.task
        return build_detector(self.build_trunk((-1,)), num_classes + 1, self.cfg.data.img_size,
                              fpn_channels=t.fpn_channels, representation_size=t.representation_size,
                              box_detections_per_img=t.detections_per_image,
                              box_batch_size_per_image=t.roi_batch, masks=t.masks)

    def head_flops_per_image(self, num_classes: int) -> float:
        from vit.models.detection import head_flops_per_image

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
        from vit.models.detection import paste_masks

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
                if self.cfg.task.masks:
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
