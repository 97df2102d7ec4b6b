"""Token-budget micro-batches for packed data (`training.tokens_per_batch`).

What an optimizer step is does not change: the samples of step k are positions
[k * S, (k + 1) * S) of the epoch's seeded order (sampling.seeded_order), S = samples per step =
per_device_train_batch_size x ranks x gradient_accumulation_steps, the last step of an epoch
shorter. The budget only re-cuts each step's samples into micro-batches ("chunks"): next-fit in
the seeded order, a chunk closed when the next sample would take it past the budget, so no
sample is split and none is seen twice. The loss of a step is the token-weighted mean over its
samples (train/loss_weighting.py), whatever the cut: the budget changes speed and memory, not
the objective, nor max_steps, epochs, warm-up or the LR schedule, which count these same steps.

HF's Trainer (4.37.2) and DeepSpeed need the same number of micro-batches in every step on
every rank, so every step gets K x ranks chunks, K = the most any step of the run needs per
rank, and a step that needs fewer is filled up with empty chunks (one token, no loss token,
no gradient). K is a pure function of (lengths, seed, S, ranks, budget, epochs): every rank
computes the same plan, and a resumed run the plan of the run it replaces.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from llmtrain.data.sampling import seeded_order


def row_lengths(dataset: Any, column: str = "input_ids") -> np.ndarray:
    """Tokens per sample of a tokenized dataset (a column of int lists): int64 [len(dataset)],
    read from Arrow offsets, 8192 rows at a time (no row is decoded)."""
    parts = [np.zeros(0, dtype=np.int64)]
    for table in dataset.select_columns(column).with_format("arrow").iter(batch_size=8192):
        offsets = np.asarray(table.column(column).combine_chunks().offsets, dtype=np.int64)
        parts.append(np.diff(offsets))
    lengths: np.ndarray = np.concatenate(parts)
    return lengths


def pack(rows: Sequence[int], lengths: np.ndarray, budget: int) -> list[list[int]]:
    """Next-fit: `rows` in their order into chunks of at most `budget` tokens each; a sample
    longer than the budget (refused by the config: budget >= data.max_length) gets its own."""
    chunks: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for row in rows:
        n = int(lengths[row])
        if current and filled + n > budget:
            chunks.append(current)
            current, filled = [], 0
        current.append(row)
        filled += n
    if current:
        chunks.append(current)
    return chunks


def steps_of_epoch(order: Sequence[int], step_samples: int) -> Iterator[Sequence[int]]:
    """The optimizer steps of one epoch's order: `step_samples` consecutive samples each."""
    for start in range(0, len(order), step_samples):
        yield order[start : start + step_samples]


def planned_epochs(samples: int, step_samples: int, max_steps: int, num_train_epochs: float) -> int:
    """How many epochs the Trainer starts: ceil(max_steps / steps per epoch) when max_steps > 0,
    else ceil(num_train_epochs)."""
    steps_per_epoch = max(1, math.ceil(samples / step_samples))
    if max_steps > 0:
        return math.ceil(max_steps / steps_per_epoch)
    return max(1, math.ceil(num_train_epochs))


def chunks_per_rank(
    lengths: np.ndarray, seed: int, epochs: int, step_samples: int, ranks: int, budget: int
) -> int:
    """K: the most chunks any step of `epochs` epochs gives one rank (chunks dealt round-robin)."""
    most = 1
    for epoch in range(epochs):
        for step in steps_of_epoch(seeded_order(len(lengths), seed, epoch), step_samples):
            most = max(most, math.ceil(len(pack(step, lengths, budget)) / ranks))
    return most


def largest_chunk(
    lengths: np.ndarray, seed: int, epochs: int, step_samples: int, budget: int
) -> int:
    """Tokens of the largest micro-batch of `epochs` epochs under the budget (the memory peak)."""
    most = 0
    for epoch in range(epochs):
        for step in steps_of_epoch(seeded_order(len(lengths), seed, epoch), step_samples):
            most = max(most, *(int(lengths[c].sum()) for c in pack(step, lengths, budget)))
    return most
