"""FSDP2 sharding and the mixed-precision policy."""
from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from vit.engine.distributed import World


def resolve_precision(precision: str, device: torch.device) -> str:
    return ("bf16" if device.type == "cuda" else "fp32") if precision == "auto" else precision


def shard_model(model: torch.nn.Module, world: World, precision: str, compile_blocks: bool = False,
                blocks: list[torch.nn.Module] | None = None, bf16_root: bool = True, unit_blocks: int = 1,
                reshard_after_forward: bool = True, float8: bool | str = False,
                compile_backend: str = "inductor") -> None:
    """`fully_shard` the transformer blocks (default `model.blocks`) in units of `unit_blocks`, then
    the root (embeddings, final norm, head; or a task's neck and heads).

    bf16 keeps bf16 compute/all-gather but reduces gradients in fp32, so the sharded fp32 master
    weights see full-precision gradient sums. `bf16_root=False` leaves the root in fp32: detection
    and segmentation heads (box regression, RoIAlign, per-pixel losses) are a small share of the
    FLOPs and are numerically touchy, so only the trunk's blocks run in bf16 there.

    Several blocks per unit and no resharding after forward (the recipe's `fsdp` settings, reasoned
    in conf/pretrain.yaml) trade memory for fewer all-gathers and less host time per step.

    `float8` (True, or "emulate" for a CPU dry run) swaps the blocks' projections to torchao's
    Float8Linear, and `compile_blocks` compiles each block (regional compilation, as torchtitan):
    both before sharding, which then wraps the blocks as they will run.
    """
    fp32 = MixedPrecisionPolicy()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else fp32
    blocks = list(model.blocks if blocks is None else blocks)
    if float8:
        convert_to_float8(blocks, world.device, emulate=float8 == "emulate")
    if compile_blocks:
        for block in blocks:
            # Per block, never per linear (fails under FSDP2, pytorch#139222): the blocks share a
            # graph per combination of drop path on/off (block 0's rate is 0) and checkpointing
            # on/off, whatever the depth; FSDP2's hooks stay outside them (dynamo skips them).
            block.compile(backend=compile_backend)
    units = [blocks[i:i + unit_blocks] for i in range(0, len(blocks), unit_blocks)]
    for i, unit in enumerate(units):
        # The last unit's parameters are needed again at once by backward: resharding them after
        # forward would only add an all-gather.
        fully_shard(unit, mesh=world.mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < len(units) - 1)
    fully_shard(model, mesh=world.mesh, mp_policy=mp if bf16_root else fp32)


FLOAT8_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def convert_to_float8(blocks: list[torch.nn.Module], device: torch.device, emulate: bool = False) -> None:
    """The blocks' attention and MLP projections (nearly all the FLOPs) become torchao Float8Linear
    with float8 all-gather: FSDP2 gathers float8 weights, half the bytes of bf16. The patch embedding
    and the head stay high precision (small, and the head's 21K-way output is sensitive). Weights
    stay in fp32 (cast per matmul), so checkpoints load with float8 on or off."""
    from vit.errors import ConfigError

    if not emulate and not (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)):
        found = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise ConfigError("train.float8", f"needs a GPU with float8 matmuls (compute capability 8.9+, e.g. H100), "
                          f"this is {found}", "set train.float8=false (or emulate for a slow CPU dry run)")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    # pad_inner_dim: float8 matmuls need inner dimensions in multiples of 16, and the weight
    # gradient's is the token count: micro-batch x 257 for ViT-H/14 at 224 px, odd for odd micro-batches.
    config = Float8LinearConfig(enable_fsdp_float8_all_gather=True, pad_inner_dim=True, emulate=emulate)
    for block in blocks:
        convert_to_float8_training(block, config=config, module_filter_fn=lambda _, name: name in FLOAT8_LINEARS)
        for name in FLOAT8_LINEARS:
            block.get_submodule(name)._register_state_dict_hook(_plain_float8_weight)


def _plain_float8_weight(module: torch.nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    # DCP pickles a tensor subclass by its class: a checkpoint would hold torchao's weight wrapper and
    # load only where torchao is imported. It holds the plain fp32 shard it wraps (same storage, so a
    # load into the state dict still lands in the parameter).
    weight = state_dict[prefix + "weight"]
    state_dict[prefix + "weight"] = DTensor.from_local(weight.to_local()._tensor, weight.device_mesh, weight.placements,
                                                       run_check=False, shape=weight.shape, stride=weight.stride())


def precompute_float8_scales_after_each_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """With float8 all-gather, a weight's scale needs its amax over all shards: without this, FSDP2's
    all-gather of each Float8Linear weight all-reduces its own amax (128 small all-reduces per step
    for ViT-H); this computes all of them in one, after each optimizer step (torchao's advice)."""
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    optimizer.register_step_post_hook(lambda *_: precompute_float8_dynamic_scale_for_fsdp(model))
