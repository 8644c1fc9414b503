"""ViTDet-style detection: a plain-ViT trunk, a simple feature pyramid and torchvision's Faster R-CNN.

The pyramid is built from the trunk's last stride-16 map alone (ViTDet, Li et al. 2022): strides
4, 8, 16, 32 by deconvolution / identity / pooling, and 64 by subsampling stride 32. The box head
is torchvision's TwoMLPHead (ViTDet uses 4 convs + LN before the MLP; the MLP is simpler and what
torchvision's Faster R-CNN expects).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign

from vit.dense import DenseViT

LEVELS = ("p2", "p3", "p4", "p5", "p6")


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SimpleFeaturePyramid(nn.Module):
    """[B, D, g, g] -> OrderedDict p2..p6 of [B, out_channels, 4g, 2g, g, g/2, g/4].

    Upsampling halves the channels per step as in ViTDet (D/4 at scale 4, D/2 at scale 2), which
    keeps the stride-4 map affordable at ViT-H width.
    """

    def __init__(self, in_channels: int, out_channels: int = 256):
        super().__init__()
        self.out_channels = out_channels
        d = in_channels
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, d // 2, 2, stride=2), LayerNorm2d(d // 2), nn.GELU(),
                          nn.ConvTranspose2d(d // 2, d // 4, 2, stride=2)),
            nn.ConvTranspose2d(d, d // 2, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])
        self.outputs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
            for c in (d // 4, d // 2, d, d))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = [out(scale(x)) for scale, out in zip(self.scales, self.outputs)]
        maps.append(F.max_pool2d(maps[-1], kernel_size=1, stride=2))
        return OrderedDict(zip(LEVELS, maps))


class ViTDetBackbone(nn.Module):
    def __init__(self, trunk: DenseViT, out_channels: int):
        super().__init__()
        self.trunk = trunk
        self.pyramid = SimpleFeaturePyramid(trunk.embed_dim, out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        # The trunk may compute in bf16 (FSDP mixed precision); neck and heads stay in fp32.
        return self.pyramid(self.trunk(x)[-1].float())


class ViTDet(FasterRCNN):
    """Faster R-CNN on canvases the data pipeline has already normalised, resized and padded.

    `forward` takes each image's real (unpadded) size on its canvas and skips torchvision's
    transform: its sizes would be the canvas, so proposals and detections would be clipped to the
    padding, where boxes survive NMS and the top-k cut that detectron2 clips away.
    """

    def forward(self, images: torch.Tensor, image_sizes: list[tuple[int, int]], targets: list[dict] | None = None):
        """images [B, 3, S, S]; image_sizes (height, width) of each image's content at the top left.
        Training: the dict of losses. Evaluation: per image, boxes in canvas pixels clipped to its size."""
        batch = ImageList(images, [(int(h), int(w)) for h, w in image_sizes])
        features = self.backbone(images)
        proposals, proposal_losses = self.rpn(batch, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        return {**detector_losses, **proposal_losses} if self.training else detections

    @property
    def trunk(self) -> DenseViT:
        # A property, not an attribute: the trunk is registered once, as backbone.trunk.
        return self.backbone.trunk


def build_detector(trunk: DenseViT, num_classes: int, img_size: int, fpn_channels: int = 256,
                   representation_size: int = 1024, box_detections_per_img: int = 100, **kwargs) -> FasterRCNN:
    """Faster R-CNN on `trunk`'s last output; `num_classes` includes the background (labels 1..K).

    The data pipeline already normalises images and pads them to an img_size x img_size canvas, so
    the transform's normalisation is the identity and its resize is at scale 1. `kwargs` go to
    torchvision's FasterRCNN (RPN / RoI-head settings).
    """
    if trunk.patch_size != 16 or trunk.grid * 16 != img_size or img_size % 32:
        raise ValueError(f"the detector needs a stride-16 trunk at img_size ({img_size}, a multiple of 32); "
                         f"got patch {trunk.patch_size}, grid {trunk.grid}")
    # ViTDet's anchors for 1024-px images, scaled with the canvas so that small test images get
    # anchors of the same relative size.
    scale = img_size / 1024
    anchors = AnchorGenerator(tuple((s * scale,) for s in (32, 64, 128, 256, 512)), ((0.5, 1.0, 2.0),) * len(LEVELS))
    return ViTDet(
        ViTDetBackbone(trunk, fpn_channels),
        min_size=img_size, max_size=img_size, image_mean=[0.0] * 3, image_std=[1.0] * 3, size_divisible=32,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(list(LEVELS[:4]), output_size=7, sampling_ratio=0),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        box_detections_per_img=box_detections_per_img, **kwargs)
