"""A training order that depends only on (seed, epoch).

HF's default RandomSampler draws each epoch's order from the global RNG, so a run resumed in a
later epoch can see a different order than the one it replaces. Here the order of epoch e is a
pure function of the seed and e: a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def seeded_order(length: int, seed: int, epoch: int) -> list[int]:
    """The training order of epoch `epoch`: a permutation of range(length), a pure function of
    (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order: list[int] = torch.randperm(length, generator=g).tolist()
    return order


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
        order = seeded_order(self.length, self.seed, self.epoch)
        # An iteration without set_epoch (HF replays finished epochs that way) moves on too.
        self.epoch += 1
        return iter(order)
