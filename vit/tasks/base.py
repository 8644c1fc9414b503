"""What every task shares: the interface the training loop calls, the evaluation split, and the
dense-prediction base of the COCO and ADE20K fine-tunes (a pretrained trunk with layer-wise LR decay)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from vit.data.loader import SeededSamples, WorkerSafeLoader, collate_samples
from vit.data.sources import build_source
from vit.engine.checkpoint import load_pretrained, resolve_checkpoint
from vit.engine.distributed import World, all_reduce_sum, broadcast_object
from vit.errors import CheckpointError
from vit.models.vit import VARIANTS


class EvalSplit:
    """This rank's share of a whole split as (images, targets, keep) batches. Every rank runs the same
    number of batches (FSDP's all-gathers are collectives): the last ones are padded with sample 0,
    and `keep` masks the padding out.

    An unreadable image is masked out too and counted (`unreadable()`): training replaces it with a
    stand-in, but here the stand-in would be scored twice, once under each image's name.
    """

    def __init__(self, source, world: World, batch: int, num_workers: int):
        self.source, self.world, self.batch, self.num_workers = source, world, batch, num_workers
        self.skipped = 0

    def __iter__(self):
        world, batch = self.world, self.batch
        per_rank = -(-len(self.source) // world.world_size)
        indices = list(range(world.rank, len(self.source), world.world_size))
        keep = [True] * len(indices) + [False] * (per_rank - len(indices))
        indices += [0] * (per_rank - len(indices))
        loader = WorkerSafeLoader(SeededSamples(self.source, seed=0), num_workers=self.num_workers,
                                  batch_sampler=[[(0, i) for i in indices[j:j + batch]]
                                                 for j in range(0, per_rank, batch)],
                                  collate_fn=collate_eval, pin_memory=world.device.type == "cuda",
                                  # its own seed source: the global RNG (drop path) must not
                                  # move, or a resume after an evaluation is not exact
                                  generator=torch.Generator())
        for j, (images, targets, failures) in enumerate(loader):
            batch_keep = keep[j * batch: j * batch + len(failures)]
            for k, failure in zip(batch_keep, failures):
                if k and failure:
                    self.skipped += 1
                    print(f"[rank {world.rank}] evaluation skips an unreadable image: {failure}", flush=True)
            yield images, targets, [k and not failure for k, failure in zip(batch_keep, failures)]

    def unreadable(self) -> int:
        """Images skipped on all ranks (a collective: every rank calls it)."""
        return int(all_reduce_sum(torch.tensor(float(self.skipped), device=self.world.device)).item())


def collate_eval(items):
    """(images, targets, per item: "" or why it was replaced by a stand-in)."""
    images, targets, _, _ = collate_samples(items)
    return images, targets, [first_bad if bad else "" for _, _, bad, first_bad in items]


def spread_blocks(depth: int, count: int = 4) -> list[int]:
    """Evenly spaced block indices ending at the last: 7, 15, 23, 31 for ViT-H (ViTDet, the issue)."""
    return [depth * (k + 1) // count - 1 for k in range(count)]


class Task:
    name = "classification"
    bf16_root = True  # see vit.engine.parallel.shard_model

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def source(self, split: str, cache_dir: str):
        return build_source(self.cfg.data, split, cache_dir=cache_dir)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def lr_scale(self, model: nn.Module) -> dict[str, float] | None:
        return None

    def head_flops_per_image(self, num_classes: int) -> float:
        """The part of `flops_per_image` spent after the trunk (the planner states its share)."""
        return 0.0


class DenseTask(Task):
    """A pretrained ViT trunk under a dense-prediction head, trained with layer-wise LR decay."""
    bf16_root = False
    trunk_prefix = ""

    def trunk_args(self, out_blocks) -> dict:
        cfg, variant = self.cfg, VARIANTS[self.cfg.model.name]
        return dict(variant=variant, img_size=cfg.data.img_size, patch_size=cfg.task.patch_size,
                    window_size=cfg.task.window_size, global_blocks=self.global_blocks(),
                    out_blocks=out_blocks, drop_path_rate=cfg.model.drop_path_rate, use_rel_pos=cfg.task.use_rel_pos)

    def global_blocks(self) -> list[int]:
        if not self.cfg.task.window_size:
            return []
        return list(self.cfg.task.global_blocks or spread_blocks(VARIANTS[self.cfg.model.name].depth))

    def build_trunk(self, out_blocks) -> nn.Module:
        from vit.models.dense import DenseViT

        trunk = DenseViT(**self.trunk_args(out_blocks))
        trunk.set_grad_checkpointing(self.cfg.model.grad_checkpointing)
        return trunk

    def load_pretrained(self, model: nn.Module) -> str:
        """Overwrite the (sharded) model's trunk with `pretrained`; returns the file or step-N checkpoint
        it came from. Rank 0 alone reads and adapts the weights; the other ranks receive just their
        shards from it. The loop calls this only when no checkpoint of the run could be loaded: a
        resumed run's own weights supersede these."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        trunk, state, error, source = self.trunk_of(model), {}, None, str(self.cfg.pretrained)
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                # A pretraining run dir means its newest checkpoint *now*: named, so that the journal
                # says which weights this run started from while that run goes on saving.
                source = source if Path(source).is_file() else str(resolve_checkpoint(source))
                state = trunk.adapt_pretrained(load_pretrained(source))
            except ValueError as e:
                error = (f"pretrained: {self.cfg.pretrained} does not fit {self.cfg.model.name} ({e}); "
                         "use a checkpoint of the same model")
            except CheckpointError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 (a damaged directory fails in DCP in any way; never hang the peers)
                error = f"pretrained: {self.cfg.pretrained} could not be read ({type(e).__name__}: {e})"
        error, source = broadcast_object((error, source))  # every rank fails alike, not waiting for rank 0's tensors
        if error:
            raise CheckpointError(error)
        set_model_state_dict(trunk, state, options=StateDictOptions(full_state_dict=True,
                                                                   broadcast_from_rank0=dist.is_initialized()))
        return source

    def trunk_of(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.trunk_prefix.rstrip("."))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(self.trunk_of(model).blocks)

    def lr_scale(self, model: nn.Module) -> dict[str, float]:
        from vit.models.dense import layer_decay_scales

        return layer_decay_scales(model, self.trunk_prefix, VARIANTS[self.cfg.model.name].depth,
                                  self.cfg.task.layer_decay)

    def flops_per_image(self, num_classes: int) -> float:
        """The trunk's and what `head_flops_per_image` counts (ADE20K's UperNet: nothing yet, so its
        MFU is a lower bound)."""
        from vit.models.dense import dense_flops_per_image

        a = self.trunk_args(None)
        return dense_flops_per_image(a["variant"], a["img_size"], a["patch_size"], a["window_size"],
                                     a["global_blocks"], a["use_rel_pos"]) + self.head_flops_per_image(num_classes)
