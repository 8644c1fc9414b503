#!/usr/bin/env python
"""FSDP2's host time per training step under each wrapping, against FSDP2's per-block defaults.

A ViT-H-shaped model (32 blocks, ViT-H's parameter tensors per block) made so narrow (width 64,
28 px, batch 2) that the step is almost all host-side work: FSDP2's hooks, casts and copies per
unit and per parameter, and the optimizer. That host time is what bounded our ViT-H step on an
H200 at micro-batch 32-64; here it can be measured on any machine. Each wrapping runs
`shard_model` (bf16 policy), fused AdamW and `vit.engine.train.train_step`, in turns after a warm-up;
the median step is compared with the first row (FSDP2's defaults) of the same run. A second
table accumulates 4 micro-batches under the recipe's wrapping and compares gathering and
reduce-scattering once per step (`train_step`'s default) with once per micro-batch.

    python benchmarks/fsdp_host_time.py                                   # 1 rank
    torchrun --standalone --nproc-per-node=2 benchmarks/fsdp_host_time.py  # 2 ranks: real collectives
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs from a checkout without `pip install`

from vit.engine.distributed import close, init_distributed  # noqa: E402
from vit.engine.optim import build_optimizer  # noqa: E402
from vit.engine.parallel import shard_model  # noqa: E402
from vit.engine.train import train_step  # noqa: E402
from vit.models.vit import Variant, VisionTransformer  # noqa: E402

# (blocks per unit, reshard after forward): FSDP2's defaults first, as the baseline.
WRAPPINGS = [(1, True), (1, False), (2, False), (4, False), (8, False)]
ACCUMULATION = 4


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="4 blocks, 1 round: a smoke test")
    args = p.parse_args(argv)
    if args.tiny:
        args.depth, args.rounds = 4, 1
    torch.set_num_threads(1)  # one core per rank, as on a GPU node's host side
    world = init_distributed("cpu")
    x, y = torch.randn(2, 3, 28, 28), torch.randint(0, 10, (2,))

    def step_fn(unit_blocks: int, reshard: bool, micro_batches: int = 1, sync_once: bool = True):
        torch.manual_seed(0)
        model = VisionTransformer(Variant(14, 64, args.depth, 16, 256), num_classes=10, img_size=28)
        shard_model(model, world, "bf16", unit_blocks=unit_blocks, reshard_after_forward=reshard)
        optimizer = build_optimizer(model, 1e-3, 0.05)
        return lambda: train_step(model, optimizer, [(x, y)] * micro_batches, world.device, sync_once=sync_once)

    steps = {w: step_fn(*w) for w in WRAPPINGS}
    accumulating = {sync_once: step_fn(4, False, ACCUMULATION, sync_once) for sync_once in (False, True)}
    steps.update({("accumulate", s): f for s, f in accumulating.items()})
    times = {k: [] for k in steps}
    for _ in range(3):  # warm-up
        for step in steps.values():
            step()
    for _ in range(args.rounds):
        for k, step in steps.items():
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
    if world.is_main:
        print(f"FSDP2 host time per step, {args.depth} blocks of width 64, {world.world_size} rank(s), "
              f"median of {args.rounds} rounds")
        print("| blocks per unit | reshard after forward | step ms | vs FSDP2 defaults |\n|---:|---|---:|---:|")
        base = statistics.median(times[WRAPPINGS[0]])
        for unit_blocks, reshard in WRAPPINGS:
            t = statistics.median(times[(unit_blocks, reshard)])
            print(f"| {unit_blocks} | {'yes' if reshard else 'no'} | {1e3 * t:.1f} | {t / base:.2f} |")
        print(f"\n{ACCUMULATION} micro-batches per step, units of 4 blocks kept gathered\n"
              "| all-gather and reduce-scatter | step ms | vs once per micro-batch |\n|---|---:|---:|")
        base = statistics.median(times[("accumulate", False)])
        for sync_once in (False, True):
            t = statistics.median(times[("accumulate", sync_once)])
            print(f"| {'once per step' if sync_once else 'once per micro-batch'} | {1e3 * t:.1f} | {t / base:.2f} |")
    close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
