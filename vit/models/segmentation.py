"""Semantic segmentation on a dense ViT trunk: BEiT/MAE-style UperNet and sliding-window inference.

The trunk (a `DenseViT`) yields four [B, D, g, g] maps from evenly spaced blocks; `MultiLevelNeck`
turns them into a x4, x2, x1, x0.5 pyramid, `UperNetHead` decodes it to logits at 4x the patch grid
(1/4 of the image for 16-pixel patches) and `FCNHead` adds the auxiliary loss on the x1 level.

Normalisation in the neck and heads is GroupNorm, not (Sync)BatchNorm: with FSDP-sharded training at
~2 images per GPU, batch statistics are noise unless synchronised across ranks every layer, and
GroupNorm needs neither running statistics nor cross-rank communication, so train and eval agree.

Its metric, mIoU, is computed beside the task (vit/tasks/ade20k.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as usual, fewer when the width is not a multiple of 32 (small test models).
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel_size: int):
        # No conv bias: GroupNorm's shift replaces it.
        super().__init__(nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=False),
                         group_norm(cout), nn.ReLU(inplace=True))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class MultiLevelNeck(nn.Module):
    """Four same-resolution trunk maps -> a pyramid at x4, x2, x1 and x0.5 of the patch grid."""

    def __init__(self, dim: int):
        super().__init__()
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, stride=2), group_norm(dim), nn.GELU(),
                          nn.ConvTranspose2d(dim, dim, 2, stride=2)),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != len(self.scales):
            raise ValueError(f"the neck needs {len(self.scales)} trunk maps, got {len(maps)}")
        return [op(x) for op, x in zip(self.scales, maps)]


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, 1)
    # Small weights, as mmseg: near-uniform initial predictions, so the heads do not swamp the trunk.
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class UperNetHead(nn.Module):
    """Pyramid pooling on the coarsest level, top-down FPN, fusion of all levels at the finest one."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), levels: int = 4, dropout: float = 0.1):
        super().__init__()
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_channels, channels, 1)) for s in pool_scales)
        self.ppm_bottleneck = ConvNormAct(in_channels + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(ConvNormAct(in_channels, channels, 1) for _ in range(levels - 1))
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in range(levels - 1))
        self.fpn_bottleneck = ConvNormAct(levels * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        top = feats[-1]
        pooled = [_resize(pool(top), top.shape[2:]) for pool in self.pools]
        laterals = [lat(x) for lat, x in zip(self.laterals, feats)]
        laterals.append(self.ppm_bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(x, size) for x in outs[1:]], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """Auxiliary head: one 3x3 conv on a single pyramid level."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, level: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.level = level
        self.conv = ConvNormAct(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(feats[self.level])))


class Segmenter(nn.Module):
    """Trunk + neck + UperNet (+ auxiliary FCN in training). `trunk.blocks` is what FSDP shards."""

    def __init__(self, trunk: nn.Module, num_classes: int = 150, channels: int = 512, aux_channels: int = 256,
                 aux_weight: float = 0.4, ignore_index: int = 255):
        super().__init__()
        self.trunk = trunk
        self.num_classes = num_classes
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index
        self.neck = MultiLevelNeck(trunk.embed_dim)
        self.decode_head = UperNetHead(trunk.embed_dim, num_classes, channels)
        self.aux_head = FCNHead(trunk.embed_dim, num_classes, aux_channels)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Eval: logits [B, K, 4g, 4g]. Train: (logits, aux_logits [B, K, g, g])."""
        # The trunk may compute in bf16 (FSDP mixed precision); the heads and the loss stay fp32.
        feats = self.neck([x.float() for x in self.trunk(images)])
        logits = self.decode_head(feats)
        return (logits, self.aux_head(feats)) if self.training else logits

    def _ce(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = _resize(logits, labels.shape[-2:])
        total = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="sum")
        # A crop with every pixel ignored gives 0 (with a graph), where torch's "mean" would give NaN.
        return total / (labels != self.ignore_index).sum().clamp(min=1)

    def loss(self, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Pixel cross-entropy at label resolution (labels [B, H, W]); accepts eval logits alone too."""
        logits, aux = outputs if isinstance(outputs, tuple) else (outputs, None)
        labels = labels.long()
        loss = self._ce(logits, labels)
        return loss if aux is None else loss + self.aux_weight * self._ce(aux, labels)


# --- sliding-window inference ---------------------------------------------------------------------

def _starts(size: int, crop: int, stride: int) -> list[int]:
    n = max(size - crop + stride - 1, 0) // stride + 1
    # The last window is moved back to end at the border, as mmseg does.
    return [max(min(i * stride + crop, size) - crop, 0) for i in range(n)]


def count_windows(h: int, w: int, crop: int, stride: int) -> int:
    """Windows `slide_inference` uses for an h x w image; it makes ceil(windows / batch) model calls."""
    return len(_starts(h, crop, stride)) * len(_starts(w, crop, stride))


@torch.no_grad()
def slide_inference(model: nn.Module, image: torch.Tensor, num_classes: int, crop: int, stride: int,
                    batch: int = 4, calls: int | None = None) -> torch.Tensor:
    """Logits [K, H, W] for one normalised image [3, H, W] or [1, 3, H, W], model in eval mode.

    Crop x crop windows with the given stride cover the image, the last one in each dimension aligned
    to the border; windows are zero-padded to crop x crop when the image is smaller, run `batch` at a
    time, their logits bilinearly resized to crop x crop, the padding cut off, summed and divided by
    the number of windows covering each pixel.

    Under FSDP every forward is a collective (parameter all-gathers), so every rank must make the same
    number of model calls or the job hangs. Ranks see images of different sizes: the caller agrees on
    `calls` (e.g. all-reduce MAX of ceil(count_windows(...) / batch)) and the extra calls run a zero
    crop whose output is discarded.
    """
    image = image.reshape(-1, *image.shape[-3:])
    if image.shape[0] != 1:
        raise ValueError(f"slide_inference takes one image, got a batch of {image.shape[0]}")
    H, W = image.shape[-2:]
    boxes = [(y, x) for y in _starts(H, crop, stride) for x in _starts(W, crop, stride)]
    h, w = min(crop, H), min(crop, W)
    needed = math.ceil(len(boxes) / batch)
    if calls is not None and calls < needed:
        raise ValueError(f"{len(boxes)} windows need {needed} calls of {batch}, but calls={calls}")
    logits = image.new_zeros((num_classes, H, W), dtype=torch.float32)
    count = image.new_zeros((1, H, W), dtype=torch.float32)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        crops = torch.cat([image[..., y:y + h, x:x + w] for y, x in chunk])
        crops = F.pad(crops, (0, crop - w, 0, crop - h))
        out = _resize(model(crops).float(), (crop, crop))[..., :h, :w]
        for (y, x), o in zip(chunk, out):
            logits[:, y:y + h, x:x + w] += o
            count[:, y:y + h, x:x + w] += 1
    for _ in range(needed, calls or 0):
        model(image.new_zeros((1, 3, crop, crop)))
    return logits / count
