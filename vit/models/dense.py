"""The plain-ViT trunk for dense prediction (ViTDet detection, UperNet segmentation).

`DenseViT` is the pretraining ViT without class token, final norm and head: it keeps the timm
parameter names (`patch_embed.proj`, `pos_embed`, `blocks.N.*`), so a pretraining checkpoint loads
by name. Most blocks may attend within non-overlapping windows (ViTDet); a few global blocks
propagate information across the image. Outputs are stride-`patch_size` maps [B, D, grid, grid].
With `use_rel_pos` every block also adds ViTDet's decomposed relative position bias (SAM's image
encoder has the same), zero at the start: pretraining has none, and zeros leave its outputs as they were.

A pretrained kernel of another patch size is converted with FlexiViT's pseudo-inverse resize:
this is how a ViT-H/14 runs at patch 16, whose stride-16 features make the pyramid strides 4..64
powers of two, as torchvision's RoIAlign and anchor code assume (it rounds feature scales to them).
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vit.models.vit import (
    Attention,
    Block,
    PatchEmbed,
    Variant,
    VisionTransformer,
    drop_path,
    init_trunk,
    resample_pos_embed,
)


def pi_resize_patch_kernel(weight: torch.Tensor, new_size: int) -> torch.Tensor:
    """Resize a [D, C, p, p] patch kernel to [D, C, n, n] so that a patch bilinearly resized from
    p x p to n x n has the same embedding as the original patch had with the original kernel.

    With R the bilinear resize as a [n*n, p*p] matrix, <R x, w'> = <x, w> for all x means
    R^T w' = w; the minimum-norm solution is w' = pinv(R^T) w (exact when upsampling, the
    least-squares best when downsampling).
    """
    p = weight.shape[-1]
    if p == new_size:
        return weight
    basis = torch.eye(p * p, dtype=torch.float64).reshape(p * p, 1, p, p)
    resize_t = F.interpolate(basis, size=(new_size, new_size), mode="bilinear", align_corners=False,
                             antialias=False).reshape(p * p, new_size * new_size)  # R^T
    flat = weight.reshape(-1, p * p).to(torch.float64)
    # Row form of w' = pinv(R^T) w for all D*C kernels at once.
    new = flat @ torch.linalg.pinv(resize_t).T
    return new.reshape(*weight.shape[:2], new_size, new_size).to(weight.dtype)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, D] -> [B * windows, window * window, D], zero-padding H and W up to multiples of window."""
    B, H, W, D = x.shape
    x = F.pad(x, (0, 0, 0, -W % window, 0, -H % window))
    Hp, Wp = x.shape[1:3]
    x = x.view(B, Hp // window, window, Wp // window, window, D).transpose(2, 3)
    return x.reshape(-1, window * window, D), (Hp, Wp)


def window_unpartition(x: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: [B * windows, window * window, D] -> [B, H, W, D], padding dropped."""
    (Hp, Wp), (H, W) = padded, size
    x = x.view(-1, Hp // window, Wp // window, window, window, x.shape[-1]).transpose(2, 3)
    return x.reshape(-1, Hp, Wp, x.shape[-1])[:, :H, :W]


def _block_indices(indices: Sequence[int], depth: int) -> list[int]:
    """Python-style (possibly negative) block indices as 0..depth-1."""
    if bad := [i for i in indices if not -depth <= i < depth]:
        raise ValueError(f"block indices {bad} out of range for depth {depth}")
    return [i % depth for i in indices]


def rel_pos_index(size: int, device=None) -> torch.Tensor:
    """[size, size] rows of the (2 size - 1)-row table for query i, key j: their offset i - j, shifted to >= 0."""
    coords = torch.arange(size, device=device)
    return coords[:, None] - coords[None, :] + size - 1


def resample_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """A [L, head_dim] relative-position table linearly resized to `length` rows (another window or grid)."""
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.T[None].float(), size=length, mode="linear", align_corners=False)
    return resized[0].T.to(table.dtype)


class RelPosAttention(Attention):
    """Attention over a size x size square of tokens plus the decomposed relative position bias of
    ViTDet: q . R_h[i_y - j_y] + q . R_w[i_x - j_x], with per-block tables shared by the heads."""

    def __init__(self, dim: int, num_heads: int, size: int):
        super().__init__(dim, num_heads)
        self.size = size
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, dim // num_heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, dim // num_heads))

    def bias(self, q: torch.Tensor) -> torch.Tensor:
        B, heads, N, head_dim = q.shape
        s = self.size
        index = rel_pos_index(s, q.device)
        grid_q = q.reshape(B, heads, s, s, head_dim)  # unscaled queries, as ViTDet
        along_h = torch.einsum("bnyxc,ykc->bnyxk", grid_q, self.rel_pos_h[index].to(q.dtype))
        along_w = torch.einsum("bnyxc,xkc->bnyxk", grid_q, self.rel_pos_w[index].to(q.dtype))
        return (along_h[..., :, None] + along_w[..., None, :]).reshape(B, heads, N, N)


class DenseBlock(Block):
    """A ViT block whose attention is global (window 0) or within windows over a grid x grid map.

    As in ViTDet the padding is added after norm1, so padding tokens are zero vectors that stay
    unmasked in attention (their keys are the qkv bias); this keeps ViTDet checkpoints equivalent.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, drop_path_rate: float, grid: int, window: int,
                 use_rel_pos: bool = False):
        super().__init__(dim, num_heads, mlp_dim, drop_path_rate)
        self.grid, self.window = grid, window
        if use_rel_pos:
            self.attn = RelPosAttention(dim, num_heads, window or grid)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.window:
            return super()._forward(x)
        B, N, D = x.shape
        h, padded = window_partition(self.norm1(x).view(B, self.grid, self.grid, D), self.window)
        h = window_unpartition(self.attn(h), self.window, padded, (self.grid, self.grid)).reshape(B, N, D)
        active = self.training and self.drops_path
        x = x + drop_path(h, self.drop_path_rate, active)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, active)


class DenseViT(nn.Module):
    """Patch embedding + position grid + blocks; `forward` returns the maps after `out_blocks`."""

    def __init__(self, variant: Variant, img_size: int, patch_size: int, window_size: int = 0,
                 global_blocks: Sequence[int] = (), out_blocks: Sequence[int] = (-1,), drop_path_rate: float = 0.0,
                 use_rel_pos: bool = False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch size {patch_size}")
        depth = variant.depth
        self.variant = variant
        self.embed_dim = dim = variant.embed_dim
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.window_size = window_size
        self.global_blocks = _block_indices(global_blocks, depth)
        self.out_blocks = _block_indices(out_blocks, depth)
        self.patch_embed = PatchEmbed(patch_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            DenseBlock(dim, variant.num_heads, variant.mlp_dim, rate, self.grid,
                       0 if i in self.global_blocks else window_size, use_rel_pos)
            for i, rate in enumerate(rates))
        if not self.pos_embed.is_meta:
            init_trunk(self)  # vit.models.vit's scheme: training from scratch behaves like the classifier

    set_grad_checkpointing = VisionTransformer.set_grad_checkpointing

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(x) + self.pos_embed
        feats = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.out_blocks:
                feats[i] = x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)
        return [feats[i] for i in self.out_blocks]

    @torch.no_grad()
    def adapt_pretrained(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A pretraining ViT's weights (timm names) as this trunk's full state dict: class token, final
        norm and head are dropped, the position grid is resampled and the patch kernel pseudo-inverse
        resized to this model's. Relative-position tables start at zero where the weights have none
        (ours never do) and are resampled to this model's windows where they have. Only shapes are
        read from `self`, so it may be sharded."""
        own = self.state_dict()
        new, missing, mismatched = {}, [], []
        for key, target in own.items():
            if key not in state_dict and ".attn.rel_pos_" in key:
                new[key] = torch.zeros(target.shape, dtype=target.dtype)
                continue
            if key not in state_dict:
                missing.append(key)
                continue
            value = state_dict[key]
            if ".attn.rel_pos_" in key and value.shape[-1] == target.shape[-1]:
                value = resample_rel_pos(value, target.shape[0])
            elif key == "pos_embed" and value.shape[-1] == target.shape[-1]:
                n = value.shape[1]
                prefix = n - math.isqrt(n) ** 2  # the class token: whatever is beyond the square grid
                value = resample_pos_embed(value, (self.grid, self.grid), num_prefix=prefix)[:, prefix:]
            elif key == "patch_embed.proj.weight" and value.shape[:2] == target.shape[:2]:
                value = pi_resize_patch_kernel(value, self.patch_size)
            if value.shape != target.shape:
                mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
            new[key] = value
        unexpected = [k for k in state_dict if k not in own and k != "cls_token"
                      and not k.startswith(("head.", "norm."))]
        problems = [f"{name}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                    for name, keys in (("missing", missing), ("mismatched", mismatched),
                                       ("unexpected", unexpected)) if keys]
        if problems:
            raise ValueError("pretrained weights do not fit this DenseViT: " + "; ".join(problems))
        return new


def layer_decay_scales(model: nn.Module, prefix: str, depth: int, decay: float) -> dict[str, float]:
    """Layer-wise learning-rate decay: embeddings are layer 0, trunk block i layer i + 1, everything
    else (neck, heads) layer depth + 1 with multiplier 1."""
    block = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
    scales = {}
    for name, _ in model.named_parameters():
        if name.startswith((prefix + "patch_embed", prefix + "pos_embed")):
            layer = 0
        elif m := block.match(name):
            layer = int(m[1]) + 1
        else:
            layer = depth + 1
        scales[name] = decay ** (depth + 1 - layer)
    return scales


def dense_flops_per_image(variant: Variant, img_size: int, patch_size: int, window_size: int,
                          global_blocks: Sequence[int], use_rel_pos: bool = False) -> float:
    """Analytic training FLOPs of the trunk (3x forward, 2 FLOPs/MAC, as vit.models.vit.train_flops_per_image).

    Window blocks run qkv, proj and attention on the padded windows, the MLP on the real tokens. A
    relative-position bias adds two query-table products per token (size D x side, side being the
    window or grid); its sum into the scores is not counted (additions only).
    """
    d, grid = variant.embed_dim, img_size // patch_size
    n = grid * grid
    global_set = set(_block_indices(global_blocks, variant.depth))
    macs = n * 3 * patch_size**2 * d
    for i in range(variant.depth):
        if window_size and i not in global_set:
            tokens, side = (math.ceil(grid / window_size) * window_size) ** 2, window_size
        else:
            tokens, side = n, grid
        macs += tokens * 4 * d * d + 2 * tokens * side**2 * d + n * 2 * d * variant.mlp_dim
        macs += 2 * tokens * side * d if use_rel_pos else 0
    return 3 * 2 * macs
