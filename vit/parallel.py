"""FSDP2 sharding and the mixed-precision policy."""
from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vit.distributed import World


def resolve_precision(precision: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def shard_model(model: torch.nn.Module, world: World, precision: str, compile_blocks: bool = False) -> None:
    """`fully_shard` every transformer block, then the root (embeddings, final norm, head).

    bf16 keeps bf16 compute/all-gather but reduces gradients in fp32, so the sharded fp32 master
    weights see full-precision gradient sums.
    """
    if precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        if compile_blocks:
            block.compile()  # per block: small graphs compile fast and FSDP hooks stay outside them
        # The last block's parameters are needed again at once by backward: resharding them after
        # forward would only add an all-gather.
        fully_shard(block, mesh=world.mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=world.mesh, mp_policy=mp)
