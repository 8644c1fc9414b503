"""The ViT is interchangeable with timm's, counts its parameters and FLOPs right, and resizes its grid."""
import pytest
import timm
import torch

from vit.models.vit import IN21K_CLASSES, VARIANTS, build_model, resample_pos_embed, train_flops_per_image


@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_loads_strictly_both_ways(name):
    with torch.device("meta"):  # shapes and names only: ViT-H would take 5 GB twice
        ours = build_model(name, num_classes=7)
        theirs = timm.create_model(f"{name}_224", num_classes=7)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert (k1, v1.shape) == (k2, v2.shape)


@pytest.mark.parametrize("name", ["vit_tiny_patch16", "vit_small_patch16"])
def test_outputs_match_timm_with_the_same_weights(name):
    torch.manual_seed(0)
    theirs = timm.create_model(f"{name}_224", num_classes=11).eval()
    ours = build_model(name, num_classes=11).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    # and the other way round, from our initialisation
    ours2 = build_model(name, num_classes=11).eval()
    theirs.load_state_dict(ours2.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours2(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_vit_huge_parameters_and_shapes_on_meta():
    with torch.device("meta"):
        backbone = build_model("vit_huge_patch14", num_classes=0)
        model = build_model("vit_huge_patch14")
    assert sum(p.numel() for p in backbone.parameters()) == 630_764_800
    assert model.head.out_features == IN21K_CLASSES == 21841
    assert sum(p.numel() for p in model.parameters()) == 630_764_800 + 1280 * 21841 + 21841
    assert model.pos_embed.shape == (1, 16 * 16 + 1, 1280)
    assert model.patch_embed.proj.weight.shape == (1280, 3, 14, 14)
    assert len(model.blocks) == 32 and model.blocks[0].attn.num_heads == 16
    assert model.blocks[0].mlp.fc1.out_features == 5120 and model.blocks[0].norm1.eps == 1e-6
    assert all(p.is_meta for p in model.parameters())


def test_training_flops_match_timm_macs():
    # timm reports 167.4 GMACs per 224-px image for vit_huge_patch14_224 (1000 classes).
    flops = train_flops_per_image("vit_huge_patch14", num_classes=1000)
    assert flops / 6 == pytest.approx(167.4e9, rel=0.002)
    assert train_flops_per_image("vit_huge_patch14") == pytest.approx(1.0e12, rel=0.01)


def test_unknown_model_is_rejected():
    with pytest.raises(KeyError, match="unknown model"):
        build_model("vit_gigantic")


def test_init_scheme():
    torch.manual_seed(0)
    model = build_model("vit_small_patch16", num_classes=5)
    assert model.pos_embed.std().item() == pytest.approx(0.02 * 0.88, rel=0.05)  # truncation shrinks the std
    assert model.cls_token.abs().max() <= 0.04  # truncated at 2 std
    assert torch.count_nonzero(model.head.weight) == 0
    # q, k and v each as JAX's own Dense layer: Xavier with the fan of a 384 x 384 part, not of the fused 1152 x 384
    parts = model.blocks[0].attn.qkv.weight.chunk(3)
    for part in parts:
        assert part.std().item() == pytest.approx((2 / (384 + 384)) ** 0.5, rel=0.05)
        assert part.abs().max() <= (6 / (384 + 384)) ** 0.5
    assert not torch.equal(parts[0], parts[1])
    sigmoid = build_model("vit_tiny_patch16", num_classes=100, sigmoid_head=True)
    assert sigmoid.head.bias[0].item() == pytest.approx(-4.6052, abs=1e-3)


def test_dropout_is_the_jax_vits_and_only_in_training():
    """ViT's ImageNet-21K runs used dropout 0.1 (after the position embedding, attention and each MLP layer)."""
    torch.manual_seed(0)
    plain = build_model("vit_tiny_patch16", num_classes=5, img_size=32)
    dropped = build_model("vit_tiny_patch16", num_classes=5, img_size=32, dropout_rate=0.1)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    plain.head.weight.data.normal_()
    dropped.head.weight.data.copy_(plain.head.weight)
    assert not torch.equal(dropped.train()(x), dropped(x))
    torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = build_model("vit_tiny_patch16", num_classes=3, img_size=32)
    b = build_model("vit_tiny_patch16", num_classes=3, img_size=32, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    assert all(blk.grad_checkpointing for blk in b.blocks)
    x = torch.randn(2, 3, 32, 32)
    a(x).sum().backward()
    b(x).sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_pos_embed_resampling_keeps_the_class_token():
    pe = torch.randn(1, 1 + 16 * 16, 8)
    out = resample_pos_embed(pe, (73, 73))
    assert out.shape == (1, 1 + 73 * 73, 8)
    torch.testing.assert_close(out[:, :1], pe[:, :1])
    assert resample_pos_embed(pe, (16, 16)) is pe
