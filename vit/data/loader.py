"""Deterministic, resumable and world-size-independent batching.

The data position is *global*: (epoch, samples consumed in that epoch). Each epoch's order is a
permutation that depends only on (seed, epoch). A step takes the next `global_batch` samples of
that order and splits them into micro-batches; rank r takes micro-batch chunks r, r+W, r+2W, ...
So the set of samples in a step never depends on the world size, a resume on any world size
continues at the same global sample, and no sample is repeated or skipped. The last
`len % global_batch` samples of an epoch's order are dropped (a different subset each epoch).

Augmentation randomness is seeded per sample from (seed, epoch, index), not from worker RNG state,
so a sample is augmented identically whichever rank or worker loads it, before or after a resume.
"""
from __future__ import annotations

import hashlib
import numbers
import random
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vit.stop import ignore_stop_signals, kill_workers_at_exit, stop_signals_blocked


class Source(Protocol):
    """A map-style image source. `load` must draw all its randomness from `rng`; its target is a class
    index, a label map or a dict of detection targets."""

    classes: list[str]

    def __len__(self) -> int: ...

    def load(self, index: int, rng: random.Random) -> tuple[torch.Tensor, Any]: ...


@dataclass
class DataPosition:
    epoch: int = 0
    offset: int = 0  # samples of this epoch's order already consumed, across all ranks

    def next_batch(self, num_samples: int, global_batch: int) -> tuple[int, int]:
        """(epoch, offset) of the next full global batch, rolling over to a new epoch if needed."""
        if global_batch > num_samples:
            raise ValueError(f"global batch {global_batch} is larger than the dataset ({num_samples} samples)")
        if self.offset + global_batch > num_samples:
            return self.epoch + 1, 0
        return self.epoch, self.offset

    def advance(self, num_samples: int, global_batch: int) -> None:
        self.epoch, self.offset = self.next_batch(num_samples, global_batch)
        self.offset += global_batch


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def sample_seed(seed: int, epoch: int, index: int, attempt: int = 0) -> int:
    key = f"{seed}/{epoch}/{index}" + (f"/retry-{attempt}" if attempt else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class RankBatches:
    """Infinite iterable of this rank's micro-batches of (epoch, index) pairs, from a start position."""

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 seed: int, start: DataPosition):
        self.num_samples, self.global_batch, self.micro_batch = num_samples, global_batch, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.start = DataPosition(start.epoch, start.offset)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        pos = DataPosition(self.start.epoch, self.start.offset)
        order_epoch, order = None, None
        while True:
            epoch, offset = pos.next_batch(self.num_samples, self.global_batch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(self.num_samples, self.seed, epoch)
            chunks = order[offset:offset + self.global_batch].reshape(-1, self.micro_batch)
            for chunk in chunks[self.rank::self.world_size]:
                yield [(epoch, int(i)) for i in chunk]
            pos.advance(self.num_samples, self.global_batch)


class SeededSamples(Dataset):
    """Loads (epoch, index) with a per-sample RNG; a sample that fails to load is replaced and counted.

    The replacement is drawn from (seed, epoch, index), so it is the same on every rank, worker and
    resume, and a bad file never changes the batch size or the data order of the other ranks. It is
    drawn at random rather than taken as the next index: broken files sit together (an interrupted
    copy, one damaged tar), and each must count once, not once per neighbour that falls back onto it.
    """

    def __init__(self, source: Source, seed: int, max_retries: int = 16):
        self.source, self.seed, self.max_retries = source, seed, max_retries

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int, str]:
        epoch, index = key
        first_bad = ""
        for attempt in range(self.max_retries):
            i = index if attempt == 0 else sample_seed(self.seed, epoch, index, attempt) % len(self.source)
            try:
                image, label = self.source.load(i, random.Random(sample_seed(self.seed, epoch, i)))
                return image, label, int(attempt > 0), first_bad
            except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on broken files
                first_bad = first_bad or f"{getattr(self.source, 'describe', str)(i)}: {e}"
        raise RuntimeError(f"index {index} and {self.max_retries - 1} random replacements are all unreadable "
                           f"(is most of data.root damaged?): {first_bad}")


def collate_samples(items):
    """(images, targets, bad count, first bad). Classification gives a batch tensor and a label tensor;
    eval-size images, box dicts and full-resolution label maps of different sizes stay lists."""
    images, targets, bad, first_bad = zip(*items)
    if all(isinstance(t, numbers.Integral) for t in targets):
        targets = torch.tensor(targets, dtype=torch.long)
    else:
        targets = _stack_or_list(targets)
    return _stack_or_list(images), targets, sum(bad), next((b for b in first_bad if b), "")


def _stack_or_list(items):
    if all(isinstance(x, torch.Tensor) and x.shape == items[0].shape for x in items):
        return torch.stack(items)
    return list(items)


class WorkerSafeLoader(DataLoader):
    """The DataLoader of a training process: its workers leave the stop signals to the rank from
    birth, and this process kills them at exit (they ignore TERM)."""

    def __init__(self, dataset, *, num_workers: int = 0, **kwargs):
        if num_workers:
            kill_workers_at_exit()
        super().__init__(dataset, num_workers=num_workers, worker_init_fn=_init_worker if num_workers else None,
                         **kwargs)

    def __iter__(self):
        with stop_signals_blocked():  # the workers start here
            return super().__iter__()


def _init_worker(worker_id: int) -> None:
    ignore_stop_signals()
    # Transforms draw from the per-sample RNG; this only pins any library that uses global RNG.
    info = torch.utils.data.get_worker_info()
    random.seed(info.seed)
    np.random.seed(info.seed % 2**32)


def build_loader(source: Source, *, global_batch: int, micro_batch: int, rank: int, world_size: int,
                 seed: int, start: DataPosition, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2) -> DataLoader:
    batches = RankBatches(len(source), global_batch, micro_batch, rank, world_size, seed, start)
    generator = torch.Generator().manual_seed(seed * 1000003 + rank)
    return WorkerSafeLoader(
        SeededSamples(source, seed), batch_sampler=batches, num_workers=num_workers, collate_fn=collate_samples,
        pin_memory=pin_memory, generator=generator,
        prefetch_factor=prefetch_factor if num_workers else None, persistent_workers=False,
    )
