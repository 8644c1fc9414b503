"""Pretraining: a ViT with a linear head on the class token, softmax or sigmoid cross-entropy with
label smoothing and optional mixup/CutMix; top-1/top-5 on the val split."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vit.engine.distributed import World, all_reduce_sum
from vit.models.vit import build_model, train_flops_per_image
from vit.tasks.base import EvalSplit, Task


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


class Classification(Task):
    def build_model(self, num_classes: int) -> nn.Module:
        cfg = self.cfg
        return build_model(cfg.model.name, num_classes, img_size=cfg.data.img_size,
                           drop_path_rate=cfg.model.drop_path_rate, dropout_rate=cfg.model.dropout_rate,
                           grad_checkpointing=cfg.model.grad_checkpointing,
                           sigmoid_head=cfg.train.loss == "sigmoid")

    def flops_per_image(self, num_classes: int) -> float:
        return train_flops_per_image(self.cfg.model.name, num_classes, self.cfg.data.img_size)

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = self.cfg.train
        if t.mixup or t.cutmix:
            images, labels = mix_batch(images, labels, model.num_classes, t.mixup, t.cutmix)
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
