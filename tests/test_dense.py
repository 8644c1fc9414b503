"""The dense-prediction trunk loads pretraining weights, attends in windows, and feeds a ViTDet detector."""
import pytest
import torch
import torch.nn.functional as F

from vit.models.dense import (
    DenseViT,
    RelPosAttention,
    dense_flops_per_image,
    layer_decay_scales,
    pi_resize_patch_kernel,
    resample_rel_pos,
    window_partition,
    window_unpartition,
)
from vit.models.detection import LayerNorm2d, build_detector, head_flops_per_image, paste_masks
from vit.models.vit import VARIANTS, Variant, VisionTransformer, build_model, resample_pos_embed, train_flops_per_image

TINY = Variant(16, 32, 4, 2, 64)


def test_pi_resized_kernel_gives_the_same_embedding_on_the_upsampled_patch():
    torch.manual_seed(0)
    w = torch.randn(8, 3, 14, 14)
    w16 = pi_resize_patch_kernel(w, 16)
    assert w16.shape == (8, 3, 16, 16) and w16.dtype == w.dtype
    x = torch.randn(5, 3, 14, 14)
    x16 = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(torch.einsum("bchw,dchw->bd", x16, w16), torch.einsum("bchw,dchw->bd", x, w),
                               atol=1e-4, rtol=1e-4)
    assert pi_resize_patch_kernel(w, 14) is w


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 10, 10, 6)
    windows, padded = window_partition(x, 4)
    assert windows.shape == (2 * 9, 16, 6) and padded == (12, 12)
    assert windows[-1].reshape(4, 4, 6)[2:].abs().sum() == 0  # the last window is half padding
    assert torch.equal(window_unpartition(windows, 4, padded, (10, 10)), x)


def test_one_window_over_the_whole_grid_is_global_attention():
    torch.manual_seed(0)
    glob = DenseViT(TINY, img_size=128, patch_size=16).eval()
    win = DenseViT(TINY, img_size=128, patch_size=16, window_size=8).eval()
    win.load_state_dict(glob.state_dict())
    win.set_grad_checkpointing()
    assert all(b.grad_checkpointing for b in win.blocks)
    x = torch.randn(2, 3, 128, 128)
    torch.testing.assert_close(win(x)[0], glob(x)[0], atol=1e-5, rtol=1e-5)


def test_windows_that_do_not_divide_the_grid_and_out_blocks():
    torch.manual_seed(0)
    model = DenseViT(TINY, img_size=160, patch_size=16, window_size=4, global_blocks=(1,), out_blocks=(0, -1),
                     drop_path_rate=0.1)
    assert model.grid == 10 and [b.window for b in model.blocks] == [4, 0, 4, 4]
    assert [b.drop_path_rate for b in model.blocks] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
    outs = model(torch.randn(2, 3, 160, 160))
    assert [o.shape for o in outs] == [(2, 32, 10, 10)] * 2 and not torch.equal(outs[0], outs[1])
    outs[1].sum().backward()
    assert model.pos_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple"):
        DenseViT(TINY, img_size=100, patch_size=16)
    with pytest.raises(ValueError, match="out of range"):
        DenseViT(TINY, img_size=160, patch_size=16, out_blocks=(4,))


def test_adapt_pretrained_drops_the_class_token_and_resamples_the_grid():
    pretrained = build_model("vit_tiny_patch16", num_classes=5, img_size=224).state_dict()
    model = DenseViT(VARIANTS["vit_tiny_patch16"], img_size=128, patch_size=16, window_size=4, global_blocks=(5, 11))
    model.load_state_dict(model.adapt_pretrained(pretrained))
    own = model.state_dict()
    for key, value in own.items():
        if key.startswith(("blocks.", "patch_embed.")):
            assert torch.equal(value, pretrained[key]), key
    assert own["pos_embed"].shape == (1, 64, 192)
    torch.testing.assert_close(own["pos_embed"], resample_pos_embed(pretrained["pos_embed"], (8, 8))[:, 1:])
    pretrained["pos_embed"] = torch.full_like(pretrained["pos_embed"], 0.5)
    model.load_state_dict(model.adapt_pretrained(pretrained))
    torch.testing.assert_close(model.pos_embed, torch.full_like(model.pos_embed, 0.5))


def test_adapt_pretrained_from_patch_14_uses_the_pseudo_inverse_kernel():
    torch.manual_seed(0)
    source = VisionTransformer(Variant(14, 32, 2, 2, 64), num_classes=0, img_size=112)
    source.init_weights()
    model = DenseViT(Variant(16, 32, 2, 2, 64), img_size=128, patch_size=16)
    model.load_state_dict(model.adapt_pretrained(source.state_dict()))
    torch.testing.assert_close(model.patch_embed.proj.weight, pi_resize_patch_kernel(source.patch_embed.proj.weight, 16))
    # An image whose patches are each upsampled 14 -> 16 has the original's patch embeddings. (Upsampling
    # the whole image instead blends neighbouring patches at their borders: close, not exact.)
    x = torch.randn(1, 3, 112, 112)
    patches = x.unfold(2, 14, 14).unfold(3, 14, 14).permute(0, 2, 3, 1, 4, 5).reshape(64, 3, 14, 14)
    patches = F.interpolate(patches, size=(16, 16), mode="bilinear", align_corners=False, antialias=False)
    up = patches.reshape(1, 8, 8, 3, 16, 16).permute(0, 3, 1, 4, 2, 5).reshape(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model.patch_embed(up), source.patch_embed(x), atol=1e-4, rtol=1e-4)


def test_adapt_pretrained_rejects_missing_and_mismatched_weights_in_one_line():
    pretrained = build_model("vit_tiny_patch16", num_classes=0, img_size=224).state_dict()
    model = DenseViT(VARIANTS["vit_tiny_patch16"], img_size=128, patch_size=16)
    del pretrained["blocks.3.mlp.fc1.weight"]
    with pytest.raises(ValueError, match="missing: blocks.3.mlp.fc1.weight") as err:
        model.adapt_pretrained(pretrained)
    assert "\n" not in str(err.value)
    wide = DenseViT(Variant(16, 64, 12, 2, 64), img_size=128, patch_size=16)
    with pytest.raises(ValueError, match=r"mismatched: pos_embed .*patch_embed.proj.weight \(192, 3, 16, 16\) vs \(64, 3, 16, 16\)") as err:
        wide.adapt_pretrained(build_model("vit_tiny_patch16", num_classes=0).state_dict())
    assert "\n" not in str(err.value) and " ..." in str(err.value)
    shallow = DenseViT(Variant(16, 192, 11, 3, 768), img_size=128, patch_size=16)
    with pytest.raises(ValueError, match="unexpected: blocks.11"):
        shallow.adapt_pretrained(build_model("vit_tiny_patch16", num_classes=0).state_dict())


def test_layer_decay_scales():
    model = torch.nn.ModuleDict({"trunk": DenseViT(TINY, img_size=64, patch_size=16), "head": torch.nn.Linear(4, 2)})
    scales = layer_decay_scales(model, "trunk.", depth=4, decay=0.5)
    assert scales["trunk.patch_embed.proj.weight"] == scales["trunk.pos_embed"] == 0.5**5
    for i in range(4):
        assert scales[f"trunk.blocks.{i}.attn.qkv.weight"] == 0.5 ** (4 - i)
    assert scales["head.weight"] == scales["head.bias"] == 1.0
    assert set(scales) == {name for name, _ in model.named_parameters()}


def test_dense_flops():
    v = VARIANTS["vit_tiny_patch16"]
    glob = dense_flops_per_image(v, 224, 16, 0, ())
    # vit.models.vit counts one more token (the class token) and the head, nothing else.
    n, d, m = 196, v.embed_dim, v.mlp_dim
    cls_token = v.depth * (4 * d * d + 2 * d * m + 2 * (2 * n + 1) * d)
    assert train_flops_per_image("vit_tiny_patch16", num_classes=0) - glob == 6 * cls_token
    assert dense_flops_per_image(v, 224, 16, 14, ()) == glob
    assert dense_flops_per_image(v, 224, 16, 5, (2, 5, 8, 11)) < glob
    # By hand: grid 2, window 1, one global block of two.
    t = Variant(4, 2, 2, 1, 3)
    embed, linear = 4 * 3 * 16 * 2, 4 * (4 * 2 * 2 + 2 * 2 * 3)
    assert dense_flops_per_image(t, 8, 4, 1, (-1,)) == 6 * (embed + 2 * linear + 2 * 4 * 1 * 2 + 2 * 4 * 4 * 2)
    # Relative positions: 2 MACs per token, channel and window (1) or grid (2) row: 2 * 4 * 2 * (1 + 2).
    assert dense_flops_per_image(t, 8, 4, 1, (-1,), use_rel_pos=True) - dense_flops_per_image(t, 8, 4, 1, (-1,)) \
        == 6 * 2 * 4 * 2 * 3


@pytest.mark.parametrize("masks", [True, False])
def test_vitdet_trains_and_predicts(masks):
    torch.manual_seed(0)
    trunk = DenseViT(TINY, img_size=128, patch_size=16, window_size=4, global_blocks=(1, 3), use_rel_pos=True)
    model = build_detector(trunk, num_classes=4, img_size=128, fpn_channels=32, representation_size=64, masks=masks)
    assert model.trunk is trunk
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and "backbone.trunk.blocks.0.attn.rel_pos_h" in names
    # ViTDet's heads: a 2-conv RPN head, 4 convs + LN then one fc for boxes, 4 convs + LN for masks.
    assert len(model.rpn.head.conv) == 2
    box_head = model.roi_heads.box_head
    assert sum(isinstance(m, torch.nn.Conv2d) for m in box_head.modules()) == 4
    assert sum(isinstance(m, LayerNorm2d) for m in box_head.modules()) == 4
    assert [m.out_features for m in box_head.modules() if isinstance(m, torch.nn.Linear)] == [64]
    assert model.roi_heads.has_mask() == masks
    images = torch.randn(2, 3, 128, 128)
    feats = model.backbone(images)
    assert list(feats) == ["p2", "p3", "p4", "p5", "p6"]
    assert [f.shape[-1] for f in feats.values()] == [32, 16, 8, 4, 2] and feats["p2"].shape[1] == 32
    sizes = [(128, 128), (96, 128)]
    square = torch.zeros(128, 128, dtype=torch.uint8)
    square[20:90, 10:60] = 1
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 5.0, 120.0, 40.0]]),
                "labels": torch.tensor([1, 3]), "masks": torch.stack([square, square.T])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 96, 128, dtype=torch.uint8)}]
    model.train()
    losses = model(images, sizes, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg",
                           *(["loss_mask"] if masks else [])}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert trunk.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert trunk.blocks[0].attn.rel_pos_h.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model(images, sizes)
    assert len(out) == 2 and all(set(o) == {"boxes", "labels", "scores", *(["masks"] if masks else [])} for o in out)
    assert all(o["boxes"].shape[1] == 4 and len(o["labels"]) == len(o["scores"]) <= 100 for o in out)
    if masks:
        assert all(o["masks"].shape[1:] == (1, 28, 28) for o in out)
    with pytest.raises(ValueError, match="stride-16"):
        build_detector(DenseViT(TINY, img_size=112, patch_size=14), num_classes=4, img_size=112)


def test_masks_are_pasted_at_their_box_pixel_centres():
    """By hand: a 28 x 28 mask of ones in box [10, 20, 30, 60] covers the pixels whose centres are
    inside, columns 10..29 and rows 20..59; its left half (mask columns 0..13) covers columns 10..19,
    as a mask pixel spans 20/28 image pixels. A box past the image is cut at its edge."""
    whole, left_half = torch.ones(28, 28), torch.zeros(28, 28)
    left_half[:, :14] = 1
    pasted = paste_masks(torch.stack([whole, left_half, whole]),
                         torch.tensor([[10.0, 20.0, 30.0, 60.0], [10.0, 20.0, 30.0, 60.0], [90.0, 70.0, 130.0, 95.0]]),
                         height=80, width=100)
    expected = torch.zeros(3, 80, 100, dtype=torch.bool)
    expected[0, 20:60, 10:30] = expected[1, 20:60, 10:20] = expected[2, 70:, 90:] = True
    assert pasted.dtype == torch.bool and torch.equal(pasted, expected)


def test_detections_are_clipped_to_each_image_not_to_the_padded_canvas():
    """Two non-square images on 64 x 64 canvases, padded at the bottom / right. Every RPN and box
    delta grows its box far beyond the canvas (dw, dh are clamped at log(1000/16): x62), so each
    proposal and each detection covers its whole image: by hand, exactly [0, 0, w, h]. Clipped to
    the canvas it would be [0, 0, 64, 64]."""
    torch.manual_seed(0)
    model = build_detector(DenseViT(TINY, img_size=64, patch_size=16), num_classes=3, img_size=64,
                           fpn_channels=16, representation_size=32).eval()
    rpn, box = model.rpn.head, model.roi_heads.box_predictor
    with torch.no_grad():
        for layer in (rpn.cls_logits, rpn.bbox_pred, box.cls_score, box.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
        rpn.bbox_pred.bias.view(-1, 4)[:, 2:] = 10.0
        box.bbox_pred.bias.view(-1, 4)[:, 2:] = 10.0
        box.cls_score.bias[2] = 6.0  # class 2 at p = 0.99; the others fall under the 0.05 score threshold
    sizes = [(40, 64), (64, 24)]  # (height, width): a landscape and a portrait image
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64), sizes)
    for (h, w), o in zip(sizes, out):
        assert o["boxes"].tolist() == [[0.0, 0.0, float(w), float(h)]] and o["labels"].tolist() == [2]


def test_relative_position_bias_by_hand():
    """2 x 2 tokens, one head of width 1 (dim 2, 2 heads; head 0 shown): bias[i, j] =
    q_i (R_h[y_i - y_j + 1] + R_w[x_i - x_j + 1]) with R_h = 1, 2, 3 and R_w = 10, 20, 30."""
    attn = RelPosAttention(dim=2, num_heads=2, size=2)
    assert attn.rel_pos_h.shape == attn.rel_pos_w.shape == (3, 1) and not attn.rel_pos_h.any()
    with torch.no_grad():
        attn.rel_pos_h.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
        attn.rel_pos_w.copy_(torch.tensor([[10.0], [20.0], [30.0]]))
    q = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 4, 1).expand(1, 2, 4, 1)  # tokens (0,0) (0,1) (1,0) (1,1)
    bias = attn.bias(q)
    assert bias.shape == (1, 2, 4, 4)
    assert bias[0, 0, 0].tolist() == [22, 12, 21, 11]
    assert bias[0, 0, 3].tolist() == [4 * 33, 4 * 23, 4 * 32, 4 * 22]
    # A window block's tables are sized for its window, a global block's for the whole grid.
    trunk = DenseViT(TINY, img_size=128, patch_size=16, window_size=3, global_blocks=(1,), use_rel_pos=True)
    assert trunk.blocks[0].attn.rel_pos_h.shape == (5, 16) and trunk.blocks[1].attn.rel_pos_w.shape == (15, 16)


def test_relative_position_table_is_resampled_linearly():
    table = torch.tensor([[0.0], [1.0], [2.0]])
    torch.testing.assert_close(resample_rel_pos(table, 5), torch.tensor([[0.0], [0.4], [1.0], [1.6], [2.0]]))
    assert resample_rel_pos(table, 3) is table


def test_zero_relative_positions_leave_the_pretrained_outputs_exactly():
    """A pretraining trunk has no relative positions: they load as zeros, the outputs are bit for bit
    those of the trunk without them, and a ViTDet checkpoint's tables are resampled to our windows."""
    torch.manual_seed(0)
    pretrained = build_model("vit_tiny_patch16", num_classes=0).state_dict()
    plain = DenseViT(VARIANTS["vit_tiny_patch16"], img_size=96, patch_size=16, window_size=4, global_blocks=(5, 11))
    rel = DenseViT(VARIANTS["vit_tiny_patch16"], img_size=96, patch_size=16, window_size=4, global_blocks=(5, 11),
                   use_rel_pos=True)
    plain.load_state_dict(plain.adapt_pretrained(pretrained))
    adapted = rel.adapt_pretrained(pretrained)
    assert not adapted["blocks.0.attn.rel_pos_h"].any() and adapted["blocks.5.attn.rel_pos_w"].shape == (11, 64)
    rel.load_state_dict(adapted)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(rel.eval()(x)[0], plain.eval()(x)[0])
    # Window 14 -> 4: a ramp 0..26 read at half-pixel centres, (i + 1/2) 27/7 - 1/2.
    vitdet = {**pretrained, "blocks.0.attn.rel_pos_h": torch.arange(27.0)[:, None].expand(27, 64)}
    assert rel.adapt_pretrained(vitdet)["blocks.0.attn.rel_pos_h"][:, 0].tolist() == pytest.approx(
        [(i + 0.5) * 27 / 7 - 0.5 for i in range(7)])
    scales = layer_decay_scales(rel, "", depth=12, decay=0.5)
    assert scales["blocks.3.attn.rel_pos_h"] == scales["blocks.3.attn.qkv.weight"] == 0.5**9


def test_head_flops_by_hand():
    """D = 8 at 64 px (grid 4), 2 channels, fc 3, 4 RoIs, 2 classes. Pyramid: deconvs 16*8*4*4*2 +
    64*4*2*4, output convs 256*(2*2+9*4) + 64*(4*2+36) + 16*(8*2+36) + 4*(8*2+36); RPN: 341
    positions * (2*9*4 + 2*5*3); box head 4 * (4*49*9*4 + 49*2*3 + 3*5*2); mask head on 1 RoI
    (a quarter of 4): 4*196*9*4 + 196*4*4 + 784*2*2."""
    pyramid = 4096 + 2048 + 10240 + 2816 + 832 + 208
    boxes_only = 6 * (pyramid + 341 * 102 + 4 * 7380)
    assert head_flops_per_image(8, 64, 2, 2, 3, 4, masks=False) == boxes_only
    assert head_flops_per_image(8, 64, 2, 2, 3, 4, masks=True) == boxes_only + 6 * 34496
