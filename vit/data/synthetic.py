"""Synthetic images for smoke runs, tests and benchmarks: no dataset needed, deterministic by seed.

Each class has a fixed colour and stripe frequency, and every sample adds its own noise, so a
model can learn it (the smoke run's loss falls) while nothing touches the disk.
"""
from __future__ import annotations

import random

import torch


class SyntheticImages:
    """`first_index` offsets the samples: a val split is the same classes with other samples."""

    def __init__(self, num_samples: int, num_classes: int, img_size: int, seed: int = 0, first_index: int = 0):
        self.num_samples, self.img_size, self.seed = num_samples, img_size, seed
        self.classes = [f"class_{i:05d}" for i in range(num_classes)]
        g = torch.Generator().manual_seed(seed)
        self.class_colour = torch.rand(num_classes, 3, 1, 1, generator=g) * 2 - 1
        self.class_freq = torch.randint(1, 6, (num_classes,), generator=g)
        labels = torch.randint(0, num_classes, (first_index + num_samples,), generator=g)
        self.labels = labels[first_index:].tolist()

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> str:
        return f"synthetic sample {index}"

    def load(self, index: int, rng: random.Random) -> tuple[torch.Tensor, int]:
        label = self.labels[index]
        g = torch.Generator().manual_seed(rng.getrandbits(63))
        ramp = torch.linspace(0, 3.1416 * float(self.class_freq[label]), self.img_size)
        stripes = torch.sin(ramp).view(1, 1, -1).expand(3, self.img_size, -1)
        noise = torch.randn(3, self.img_size, self.img_size, generator=g)
        return self.class_colour[label] + 0.5 * stripes + 0.5 * noise, label
