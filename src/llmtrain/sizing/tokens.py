"""Tokens per micro-batch from the data's measured sample lengths, not from data.max_length.

Activation and logits memory grow with the tokens of the largest micro-batch. With padding it is
per_device_train_batch_size x the longest sample (padded to 8); packed padding-free it is the
sum of the samples the seeded order puts together, which for instruction and chat data is a
fraction of batch x max_length (2.9x less on a real chat set); under a token budget it is the
largest chunk the plan cuts (data/token_budget.py). These are computed here as the run draws
them: the same seeded order over the epochs the Trainer will start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from llmtrain.config import RunConfig
from llmtrain.data import prepared, token_budget
from llmtrain.data.sampling import seeded_order


@dataclass(frozen=True)
class Measured:
    """Per-sample token counts (int64 [n]) and where they come from, for the report."""

    lengths: np.ndarray
    source: str


def from_prepared(cfg: RunConfig) -> Measured | None:
    """The training split's lengths from the prepared data of this config (`llmtrain prepare`),
    or None when there is none. Not checked against the config's fingerprint (that needs the
    tokenizer): a stale directory is the user's to re-prepare."""
    target = cfg.prepared_dir()
    if prepared.read_info(target) is None or not (target / "train").is_dir():
        return None
    lengths = token_budget.row_lengths(prepared.load(target)["train"])
    return Measured(lengths, f"{len(lengths)} prepared samples")


def largest_micro_batch_tokens(cfg: RunConfig, lengths: np.ndarray, ranks: int) -> int:
    """Tokens of the largest packed micro-batch of the run (padding-free packing: the whole
    micro-batch is one row; with a token budget, the largest chunk), over its planned epochs."""
    t = cfg.training
    step_samples = t.per_device_train_batch_size * ranks * t.gradient_accumulation_steps
    n = len(lengths)
    epochs = token_budget.planned_epochs(n, step_samples, t.max_steps, t.num_train_epochs)
    if t.tokens_per_batch is not None:
        budget = t.tokens_per_batch
        return token_budget.largest_chunk(lengths, t.seed, epochs, step_samples, budget)
    b = t.per_device_train_batch_size
    most = 0
    for epoch in range(epochs):  # consecutive micro-batches of the order (loss_weighting pads
        order = lengths[seeded_order(len(lengths), t.seed, epoch)]  # the end with 1-token ones)
        padded = np.concatenate([order, np.ones(math.ceil(len(order) / b) * b - len(order))])
        most = max(most, int(padded.reshape(-1, b).sum(1).max()))
    return most


def padded_width(lengths: np.ndarray) -> int:
    """The widest padded batch: the longest sample, padded to a multiple of 8 (PadCollator)."""
    return -(-int(lengths.max()) // 8) * 8 if len(lengths) else 8
