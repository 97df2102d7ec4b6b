"""A training order that depends only on (seed, epoch).

HF's default RandomSampler draws each epoch's order from the global RNG, so a run resumed in a
later epoch can see a different order than the one it replaces. Here the order of epoch e is a
pure function of the seed and e: a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSeededSampler(Sampler[int]):
    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's data loader at each epoch start."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=g).tolist()
        # An iteration without set_epoch (HF replays finished epochs that way) moves on too.
        self.epoch += 1
        return iter(order)
