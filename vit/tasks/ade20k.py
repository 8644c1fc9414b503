"""ADE20K semantic segmentation: the trunk at four depths under UperNet with an FCN auxiliary head,
scored by dataset-level mIoU as mmseg computes it: per-class intersection and union areas are summed
over every image and rank before dividing, and mIoU averages only the classes that occur."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vit.data.ade20k import IGNORE_INDEX
from vit.engine.distributed import World, all_reduce_max, all_reduce_sum
from vit.models.vit import VARIANTS
from vit.tasks.base import DenseTask, EvalSplit, spread_blocks


class ADE20KSegmentation(DenseTask):
    name = "ade20k"
    trunk_prefix = "trunk."

    def build_model(self, num_classes: int) -> nn.Module:
        from vit.models.segmentation import Segmenter

        t = self.cfg.task
        out_blocks = list(t.out_blocks or spread_blocks(VARIANTS[self.cfg.model.name].depth))
        return Segmenter(self.build_trunk(out_blocks), num_classes, channels=t.channels,
                         aux_channels=t.aux_channels, aux_weight=t.aux_weight, ignore_index=IGNORE_INDEX)

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return model.loss(model(images), labels.to(images.device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, source, world: World) -> dict:
        """mIoU over the whole split: intersections and unions are summed per class over every image
        and rank, then divided. Sliding windows on the short-side-resized image; logits are resized
        to the original label."""
        from vit.models.segmentation import count_windows, slide_inference

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


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = 255) -> torch.Tensor:
    """[4, K] float64: area_intersect, area_union, area_pred, area_label over the labelled pixels.

    Sum these over the dataset (and all-reduce SUM across ranks) before `summarize`.
    """
    valid = label != ignore_index
    pred, label = pred[valid].long(), label[valid].long()
    if label.numel() and (int(label.max()) >= num_classes or int(pred.max()) >= num_classes):
        raise ValueError(f"class index beyond num_classes={num_classes} (labels must be remapped first)")
    intersect = torch.bincount(label[pred == label], minlength=num_classes)
    area_pred = torch.bincount(pred, minlength=num_classes)
    area_label = torch.bincount(label, minlength=num_classes)
    return torch.stack([intersect, area_pred + area_label - intersect, area_pred, area_label]).double()


def summarize(totals: torch.Tensor) -> dict:
    """mIoU, aAcc, mAcc (fractions) and per-class IoU (None for classes absent from labels and preds).

    Like mmseg's nanmean, mIoU skips classes with union 0 and mAcc classes with no labelled pixel.
    """
    intersect, union, _, area_label = totals.double().cpu()
    present, labelled = union > 0, area_label > 0
    iou = intersect / union
    return {
        "mIoU": iou[present].mean().item(),
        "aAcc": (intersect.sum() / area_label.sum()).item(),
        "mAcc": (intersect[labelled] / area_label[labelled]).mean().item(),
        "per_class_iou": [v.item() if p else None for v, p in zip(iou, present)],
    }
