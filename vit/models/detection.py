"""ViTDet (Li et al. 2022): a plain-ViT trunk, a simple feature pyramid and Mask R-CNN heads.

The pyramid is built from the trunk's last stride-16 map alone: strides 4, 8, 16, 32 by
deconvolution / identity / pooling, and 64 by subsampling stride 32. The heads are ViTDet's
(detectron2 projects/ViTDet, common/models/mask_rcnn_vitdet.py) on torchvision's RPN and RoI
heads: a 2-conv RPN head, a "4conv1fc" box head (4 convs + LayerNorm, one fc) and a mask head of
4 convs + LayerNorm, a deconvolution and 28 x 28 per-class masks; masks can be left out.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from vit.models.dense import DenseViT

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


class ViTDet(nn.Module):
    """Mask (or Faster) R-CNN on canvases the data pipeline has already normalised, resized and padded.

    `forward` takes each image's real (unpadded) size on its canvas, which torchvision's transform
    would take to be the canvas: proposals and detections are clipped to the image, as detectron2
    clips them, never to the padding, where boxes would survive NMS and the top-k cut.
    """

    def __init__(self, backbone: ViTDetBackbone, rpn: RegionProposalNetwork, roi_heads: RoIHeads):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads = backbone, rpn, roi_heads

    @property
    def trunk(self) -> DenseViT:
        # A property, not an attribute: the trunk is registered once, as backbone.trunk.
        return self.backbone.trunk

    def forward(self, images: torch.Tensor, image_sizes: list[tuple[int, int]], targets: list[dict] | None = None):
        """images [B, 3, S, S]; image_sizes (height, width) of each image's content at the top left.
        Training: the dict of losses. Evaluation: per image, boxes in canvas pixels clipped to its
        size, labels, scores and (with masks) [N, 1, 28, 28] mask probabilities of the box."""
        batch = ImageList(images, [(int(h), int(w)) for h, w in image_sizes])
        features = self.backbone(images)
        proposals, proposal_losses = self.rpn(batch, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        return {**detector_losses, **proposal_losses} if self.training else detections


def build_detector(trunk: DenseViT, num_classes: int, img_size: int, fpn_channels: int = 256,
                   representation_size: int = 1024, box_detections_per_img: int = 100,
                   box_batch_size_per_image: int = 512, masks: bool = True) -> ViTDet:
    """ViTDet's Mask R-CNN (Faster R-CNN without `masks`) on `trunk`'s last output; `num_classes`
    includes the background (labels 1..K). Thresholds and sample counts are detectron2's."""
    if trunk.patch_size != 16 or trunk.grid * 16 != img_size or img_size % 32:
        raise ValueError(f"the detector needs a stride-16 trunk at img_size ({img_size}, a multiple of 32); "
                         f"got patch {trunk.patch_size}, grid {trunk.grid}")
    c = fpn_channels
    # ViTDet's anchors for 1024-px images, scaled with the canvas so that small test images get
    # anchors of the same relative size.
    scale = img_size / 1024
    anchors = AnchorGenerator(tuple((s * scale,) for s in (32, 64, 128, 256, 512)), ((0.5, 1.0, 2.0),) * len(LEVELS))
    rpn = RegionProposalNetwork(
        anchors, RPNHead(c, anchors.num_anchors_per_location()[0], conv_depth=2),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
        pre_nms_top_n={"training": 2000, "testing": 1000}, post_nms_top_n={"training": 1000, "testing": 1000},
        nms_thresh=0.7)
    roi_heads = RoIHeads(
        MultiScaleRoIAlign(list(LEVELS[:4]), output_size=7, sampling_ratio=0),
        FastRCNNConvFCHead((c, 7, 7), [c] * 4, [representation_size], norm_layer=LayerNorm2d),
        FastRCNNPredictor(representation_size, num_classes),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=box_batch_size_per_image, positive_fraction=0.25,
        bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=box_detections_per_img)
    if masks:
        roi_heads.mask_roi_pool = MultiScaleRoIAlign(list(LEVELS[:4]), output_size=14, sampling_ratio=0)
        roi_heads.mask_head = MaskRCNNHeads(c, [c] * 4, 1, norm_layer=LayerNorm2d)
        roi_heads.mask_predictor = MaskRCNNPredictor(c, c, num_classes)
    return ViTDet(ViTDetBackbone(trunk, c), rpn, roi_heads)


def paste_masks(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                threshold: float = 0.5) -> torch.Tensor:
    """[N, M, M] mask probabilities of `boxes` [N, 4] (x1, y1, x2, y2 in an height x width image) as
    [N, height, width] booleans. As detectron2's paste: each pixel centre is sampled bilinearly at
    its place in the box (torchvision's paste adds a pixel to every box, Detectron1's convention).
    Only the pixels under each box are computed."""
    out = torch.zeros(len(masks), height, width, dtype=torch.bool)
    for mask, (x1, y1, x2, y2), pasted in zip(masks.float(), boxes.tolist(), out):
        left, top = max(int(x1), 0), max(int(y1), 0)
        right, bottom = min(math.ceil(x2) + 1, width), min(math.ceil(y2) + 1, height)
        if right <= left or bottom <= top:
            continue
        gx = (torch.arange(left, right) + 0.5 - x1) / max(x2 - x1, 1e-6) * 2 - 1
        gy = (torch.arange(top, bottom) + 0.5 - y1) / max(y2 - y1, 1e-6) * 2 - 1
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), -1)
        sampled = F.grid_sample(mask[None, None], grid[None], align_corners=False)[0, 0]
        pasted[top:bottom, left:right] = sampled >= threshold
    return out


def head_flops_per_image(embed_dim: int, img_size: int, num_classes: int, fpn_channels: int = 256,
                         representation_size: int = 1024, roi_batch: int = 512, masks: bool = True,
                         positive_fraction: float = 0.25) -> float:
    """Analytic training FLOPs of everything after the trunk (3x forward, 2 FLOPs/MAC, as the trunk's):
    pyramid, RPN head on every level, box head on the `roi_batch` sampled RoIs and mask head on their
    positives, taken at the `positive_fraction` bound (images with few objects have fewer). RoIAlign,
    norms, pooling and NMS are not counted: they move memory, they do few multiply-adds."""
    d, c, g, k = embed_dim, fpn_channels, img_size // 16, num_classes
    macs = g * g * d * (d // 2) * 4 * 2  # both D -> D/2 deconvolutions (2 x 2), at scales 4 and 2
    macs += (2 * g) ** 2 * (d // 2) * (d // 4) * 4  # D/2 -> D/4 at scale 4
    for side, channels in ((4 * g, d // 4), (2 * g, d // 2), (g, d), (g // 2, d)):
        macs += side * side * (channels * c + 9 * c * c)  # 1 x 1 then 3 x 3 output convs
    anchors = 3
    positions = sum((4 * g >> level) ** 2 for level in range(len(LEVELS)))
    macs += positions * (2 * 9 * c * c + c * 5 * anchors)  # two 3 x 3 convs, objectness and deltas
    box = 4 * 49 * 9 * c * c + 49 * c * representation_size + representation_size * 5 * k
    macs += roi_batch * box
    if masks:
        mask = 4 * 196 * 9 * c * c + 196 * c * c * 4 + 784 * c * k  # 4 convs at 14 x 14, deconv, predictor
        macs += round(roi_batch * positive_fraction) * mask
    return 3 * 2 * macs
