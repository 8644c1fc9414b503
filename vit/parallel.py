"""FSDP2 sharding and the mixed-precision policy."""
from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vit.distributed import World


def resolve_precision(precision: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def shard_model(model: torch.nn.Module, world: World, precision: str, compile_blocks: bool = False,
                blocks: list[torch.nn.Module] | None = None, bf16_root: bool = True, unit_blocks: int = 1,
                reshard_after_forward: bool = True) -> None:
    """`fully_shard` the transformer blocks (default `model.blocks`) in units of `unit_blocks`, then
    the root (embeddings, final norm, head; or a task's neck and heads).

    bf16 keeps bf16 compute/all-gather but reduces gradients in fp32, so the sharded fp32 master
    weights see full-precision gradient sums. `bf16_root=False` leaves the root in fp32: detection
    and segmentation heads (box regression, RoIAlign, per-pixel losses) are a small share of the
    FLOPs and are numerically touchy, so only the trunk's blocks run in bf16 there.

    Several blocks per unit and no resharding after forward (the recipe's `fsdp` settings, reasoned
    in conf/pretrain.yaml) trade memory for fewer all-gathers and less host time per step.
    """
    fp32 = MixedPrecisionPolicy()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else fp32
    blocks = list(model.blocks if blocks is None else blocks)
    if compile_blocks:
        for block in blocks:
            block.compile()  # per block: small graphs compile fast and FSDP hooks stay outside them
    units = [blocks[i:i + unit_blocks] for i in range(0, len(blocks), unit_blocks)]
    for i, unit in enumerate(units):
        # The last unit's parameters are needed again at once by backward: resharding them after
        # forward would only add an all-gather.
        fully_shard(unit, mesh=world.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(units) - 1)
    fully_shard(model, mesh=world.mesh, mp_policy=mp if bf16_root else fp32)
