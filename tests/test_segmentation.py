"""UperNet segmenter on the dense trunk: shapes, loss, sliding-window inference and mmseg's mIoU."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vit.models.dense import DenseViT
from vit.models.segmentation import Segmenter, count_windows, slide_inference
from vit.models.vit import Variant
from vit.tasks.ade20k import intersect_and_union, summarize

K = 5


def numpy_metrics(preds, labels, k, ignore=255):
    """Reference: one confusion matrix (rows label, columns prediction) over every image."""
    cm = np.zeros((k, k), np.int64)
    for p, l in zip(preds, labels):
        valid = l != ignore
        np.add.at(cm, (l[valid], p[valid]), 1)
    diag, rows, cols = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = diag / (rows + cols - diag), diag / rows
    return cm, iou, {"mIoU": np.nanmean(iou), "aAcc": diag.sum() / cm.sum(), "mAcc": np.nanmean(acc)}


def random_image(rng, h, w, k):
    # Labels use classes 0..k-3; predictions also k-2 (predicted, never labelled); k-1 only where
    # ignored, so it is absent from both as far as the metric is concerned.
    label = rng.integers(0, k - 2, (h, w))
    pred = np.where(rng.random((h, w)) < 0.6, label, rng.integers(0, k - 1, (h, w)))
    ignored = rng.random((h, w)) < 0.2
    return np.where(ignored, k - 1, pred), np.where(ignored, 255, label)


def test_metric_matches_a_numpy_confusion_matrix_summed_over_the_dataset():
    rng = np.random.default_rng(0)
    k = 6
    preds, labels = zip(*(random_image(rng, h, w, k) for h, w in [(7, 9), (13, 5), (16, 16), (3, 40)]))
    per_image = [intersect_and_union(torch.from_numpy(p), torch.from_numpy(l), k) for p, l in zip(preds, labels)]
    totals = sum(per_image)
    cm, iou, expected = numpy_metrics(preds, labels, k)
    diag, rows, cols = np.diag(cm), cm.sum(1), cm.sum(0)
    np.testing.assert_array_equal(totals.numpy(), np.stack([diag, rows + cols - diag, cols, rows]))
    assert totals.dtype == torch.float64

    got = summarize(totals)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12)
    assert got["per_class_iou"][k - 1] is None and math.isnan(iou[k - 1])
    assert got["per_class_iou"][k - 2] == 0.0  # predicted but never labelled: counts in mIoU as 0
    np.testing.assert_allclose([v for v in got["per_class_iou"] if v is not None], iou[:-1])

    # Averaging per-image mIoU is a different (wrong) number: the areas must be summed first.
    mean_of_images = np.mean([summarize(t)["mIoU"] for t in per_image])
    assert abs(mean_of_images - got["mIoU"]) > 1e-3


def test_metric_rejects_unmapped_labels():
    with pytest.raises(ValueError, match="num_classes"):
        intersect_and_union(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 7), num_classes=5)


def make_segmenter(seed=0):
    torch.manual_seed(seed)
    trunk = DenseViT(Variant(16, 32, 4, 2, 64), img_size=64, patch_size=16, out_blocks=(0, 1, 2, 3))
    return Segmenter(trunk, num_classes=K, channels=64, aux_channels=32)


def test_segmenter_shapes_loss_and_gradients():
    model = make_segmenter().train()
    images = torch.randn(2, 3, 64, 64)
    logits, aux = model(images)
    assert logits.shape == (2, K, 16, 16) and aux.shape == (2, K, 4, 4)
    labels = torch.randint(0, K, (2, 64, 64))
    labels[:, :8] = 255
    loss = model.loss((logits, aux), labels)
    assert loss.isfinite() and loss.ndim == 0
    loss.backward()
    for p in [model.trunk.patch_embed.proj.weight, *model.trunk.blocks[0].parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        assert model(images).shape == (2, K, 16, 16)


def test_ignored_pixels_do_not_count():
    model = make_segmenter().train()
    logits, aux = model(torch.randn(2, 3, 64, 64))
    labels = torch.full((2, 64, 64), 255)
    assert model.loss((logits, aux), labels) == 0  # all ignored: 0, not NaN
    labels[1, 40, 21] = 3

    def pixel_ce(out):
        up = F.interpolate(out, size=(64, 64), mode="bilinear", align_corners=False)
        return -up[1, :, 40, 21].log_softmax(0)[3]

    expected = pixel_ce(logits) + 0.4 * pixel_ce(aux)
    torch.testing.assert_close(model.loss((logits, aux), labels), expected)
    torch.testing.assert_close(model.loss(logits, labels), pixel_ce(logits))


def test_bf16_trunk_feeds_fp32_heads():
    model = make_segmenter().eval()
    model.trunk.to(torch.bfloat16)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)).dtype == torch.float32


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, x):
        self.inputs.append(x)
        return self.model(x)


def up(logits, size=(64, 64)):
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def test_slide_inference_on_a_crop_sized_and_a_small_image_is_one_forward():
    model = make_segmenter().eval()
    image = torch.randn(3, 64, 64)
    assert count_windows(64, 64, 64, 43) == 1
    torch.testing.assert_close(slide_inference(model, image, K, 64, 43), up(model(image[None])))
    # Smaller than the crop: zero-padded to 64 x 64, the padding's logits cut off.
    small = torch.randn(1, 3, 40, 50)
    expected = up(model(F.pad(small, (0, 14, 0, 24))))[:, :40, :50]
    torch.testing.assert_close(slide_inference(model, small, K, 64, 43), expected)


@torch.no_grad()
def test_slide_inference_averages_overlapping_windows_and_pads_calls():
    model = Counting(make_segmenter().eval())
    image = torch.randn(3, 64, 100)
    assert count_windows(64, 100, 64, 43) == 2  # x = 0 and x = 36, the last aligned to the border
    out = slide_inference(model, image, K, crop=64, stride=43, batch=1)
    assert out.shape == (K, 64, 100) and len(model.inputs) == 2
    left, right = up(model.model(image[None, :, :, :64])), up(model.model(image[None, :, :, 36:]))
    expected = torch.zeros(K, 64, 100)
    expected[:, :, :64] += left
    expected[:, :, 36:] += right
    expected[:, :, 36:64] /= 2
    torch.testing.assert_close(out, expected)

    # A larger image in batches of 4: ceil(windows / 4) calls, or exactly `calls` when forced,
    # the extra ones on zero crops whose outputs do not change the result.
    image = torch.randn(1, 3, 100, 150)
    windows = count_windows(100, 150, 64, 43)
    assert windows == 6
    model.inputs.clear()
    base = slide_inference(model, image, K, 64, 43, batch=4)
    assert len(model.inputs) == math.ceil(windows / 4)
    model.inputs.clear()
    padded = slide_inference(model, image, K, 64, 43, batch=4, calls=5)
    assert len(model.inputs) == 5 and all(not x.any() for x in model.inputs[2:])
    torch.testing.assert_close(padded, base)
    with pytest.raises(ValueError, match="calls"):
        slide_inference(model, image, K, 64, 43, batch=4, calls=1)
