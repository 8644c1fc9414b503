"""A compact Vision Transformer whose state dicts are interchangeable with timm's.

Parameter names follow timm's `vision_transformer.py` (`patch_embed.proj`, `blocks.N.attn.qkv`,
`norm`, `head`), so `timm.create_model("<variant>_224").load_state_dict(ours.state_dict())` works
in both directions. Variants are data (a table of widths and depths), not code.

Initialisation (big_vision / JAX-ViT style, chosen because it trains stably at ViT-H scale
without per-layer tuning):
  * linear layers: Xavier-uniform weights, zero bias (the MLP's fc1/fc2 bias gets a tiny normal
    so that the biases are not exactly symmetric); the fused qkv as three D x D layers, as JAX's;
  * patch embedding: LeCun-normal on the flattened kernel (it is a linear layer on patches);
  * class token and position embedding: normal with std 0.02 truncated at 2 std;
  * LayerNorm: ones and zeros;
  * classification head: zeros, so the initial logits are uniform and the first loss is ln(K)
    (for the sigmoid loss the head bias starts at -ln(K), the prior of a one-hot label).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Variant:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int


# Each matches timm's model of the same name with the `_224` suffix.
VARIANTS: dict[str, Variant] = {
    "vit_tiny_patch16": Variant(16, 192, 12, 3, 768),
    "vit_small_patch16": Variant(16, 384, 12, 6, 1536),
    "vit_base_patch16": Variant(16, 768, 12, 12, 3072),
    "vit_large_patch16": Variant(16, 1024, 24, 16, 4096),
    "vit_huge_patch14": Variant(14, 1280, 32, 16, 5120),
}

IN21K_CLASSES = 21841


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, N, D


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        # SDPA picks the flash / memory-efficient kernels on GPU (the memory-efficient one with a bias).
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=self.bias(qkv[0]))
        return self.proj(x.transpose(1, 2).reshape(B, N, D))

    def bias(self, q: torch.Tensor) -> torch.Tensor | None:
        """An additive attention bias from the queries [B, heads, N, head_dim]; none in plain ViT."""
        return None


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = dropout(self.act(self.fc1(x)), self.dropout, self.training)
        return dropout(self.fc2(x), self.dropout, self.training)


def dropout(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """JAX ViT's dropout (after the position embedding, the attention and each MLP layer); free at 0."""
    return F.dropout(x, rate, training) if rate and training else x


def drop_path(x: torch.Tensor, rate: torch.Tensor | float, active: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability `rate`, if `active`."""
    if not active:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - rate)
    return x * keep / (1.0 - rate)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, drop_path_rate: float = 0.0, dropout_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim, dropout_rate)
        self.dropout_rate = dropout_rate  # one value for every block: compiles into a single graph
        # A 0-d tensor, not a float: torch.compile specialises on float attributes, and the rate grows
        # with depth, so every block would compile its own graph and those past the recompile limit
        # (8) would silently run eagerly. Not persistent: the state dict stays timm's.
        self.register_buffer("drop_path_rate", torch.tensor(float(drop_path_rate)), persistent=False)
        self.drops_path = drop_path_rate > 0
        # Recompute this block's activations in backward; set per block by `set_grad_checkpointing`.
        self.grad_checkpointing = False

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self.training and self.drops_path
        h = dropout(self.attn(self.norm1(x)), self.dropout_rate, self.training)
        x = x + drop_path(h, self.drop_path_rate, active)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, active)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class VisionTransformer(nn.Module):
    def __init__(self, variant: Variant, num_classes: int = IN21K_CLASSES, img_size: int = 224,
                 drop_path_rate: float = 0.0, dropout_rate: float = 0.0):
        super().__init__()
        if img_size % variant.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch size {variant.patch_size}")
        self.variant = variant
        self.img_size = img_size
        self.num_classes = num_classes
        self.embed_dim = dim = variant.embed_dim
        self.grid_size = img_size // variant.patch_size
        self.patch_embed = PatchEmbed(variant.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2 + 1, dim))
        # Linearly increasing drop-path rate with depth, as in DeiT / ViTDet.
        rates = [drop_path_rate * i / max(variant.depth - 1, 1) for i in range(variant.depth)]
        self.blocks = nn.ModuleList(Block(dim, variant.num_heads, variant.mlp_dim, r, dropout_rate) for r in rates)
        self.dropout_rate = dropout_rate
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.no_grad()
    def init_weights(self, sigmoid_head: bool = False) -> None:
        init_trunk(self)
        _trunc_normal(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, -math.log(self.num_classes) if sigmoid_head else 0.0)

    def set_grad_checkpointing(self, blocks: int | bool | str = True) -> None:
        """Recompute activations in backward: in every block (True), none (False/0), every other one
        ("selective": blocks 1, 3, 5, ..., as torchtitan's every-2nd-layer option) or the first N."""
        for i, block in enumerate(self.blocks):
            block.grad_checkpointing = i % 2 == 1 if blocks == "selective" else blocks is True or i < int(blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = dropout(x, self.dropout_rate, self.training)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])


@torch.no_grad()
def init_trunk(model: nn.Module) -> None:
    """The scheme above for every linear and norm layer, the patch embedding and `pos_embed` of a
    ViT (also the dense-prediction trunk in vit/models/dense.py)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.endswith("attn.qkv"):
            # JAX's q, k and v are three Dense layers: Xavier on each D x D part's own fan. On the
            # fused 3D x D weight the fan would be 4D, not 2D, and every weight sqrt(2) too small.
            for part in m.weight.chunk(3):
                nn.init.xavier_uniform_(part)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if ".mlp." in f".{name}.":
                nn.init.normal_(m.bias, std=1e-6)
            else:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.patch_embed.proj.weight
    _trunc_normal(w, std=math.sqrt(1.0 / w[0].numel()))
    nn.init.zeros_(model.patch_embed.proj.bias)
    _trunc_normal(model.pos_embed, std=0.02)


def _trunc_normal(t: torch.Tensor, std: float) -> None:
    # Cut at 2 std: torch's defaults (a=-2, b=2) are absolute and would not truncate at all here.
    nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


def build_model(name: str, num_classes: int = IN21K_CLASSES, *, img_size: int = 224,
                drop_path_rate: float = 0.0, dropout_rate: float = 0.0, grad_checkpointing: int | bool = False,
                sigmoid_head: bool = False) -> VisionTransformer:
    """Build and initialise a registered variant. Under `torch.device("meta")` nothing is allocated."""
    if name not in VARIANTS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(VARIANTS)}")
    model = VisionTransformer(VARIANTS[name], num_classes, img_size, drop_path_rate, dropout_rate)
    if not any(p.is_meta for p in model.parameters()):
        model.init_weights(sigmoid_head=sigmoid_head)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Bicubically resize the patch part of a position embedding; prefix tokens (class) are kept as is."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(math.isqrt(grid.shape[1]))
    if (old, old) == tuple(new_grid):
        return pos_embed
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=old > min(new_grid))
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def train_flops_per_image(name: str, num_classes: int = IN21K_CLASSES, img_size: int = 224) -> float:
    """Analytic training FLOPs per image: 3x the forward (backward costs twice the forward), 2 FLOPs/MAC."""
    v = VARIANTS[name]
    patches = (img_size // v.patch_size) ** 2
    n, d = patches + 1, v.embed_dim
    per_block = n * (4 * d * d + 2 * d * v.mlp_dim) + 2 * n * n * d  # qkv+proj, mlp, QK^T and AV
    macs = patches * 3 * v.patch_size**2 * d + v.depth * per_block + d * num_classes
    return 3 * 2 * macs
