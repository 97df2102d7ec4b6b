"""The Trainer's side of token-budget micro-batches (data/token_budget.py has the plan).

The DataLoader's batch is one chunk (per_device_train_batch_size=1 for HF): the sampler yields
a StepChunk per micro-batch, the dataset turns it into its samples, and the collator packs them
into one row. accelerate hands rank r the items r, r + W, r + 2W, ... (BatchSamplerShard,
split_batches=False), so chunk i of a step goes to rank i mod W, as its (i // W)-th
micro-batch; chunks past a step's own are empty. HF's gradient_accumulation_steps is K (the
plan's chunks per rank), so the loss of each step is still divided by the step's loss tokens
over all its chunks and ranks (loss_weighting.backward_scale), counted here from the plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
from torch.utils.data import Sampler

from llmtrain.config import RunConfig
from llmtrain.data import token_budget
from llmtrain.data.sampling import seeded_order

log = logging.getLogger(__name__)


class StepChunk(NamedTuple):
    """One micro-batch: its dataset rows (empty: a one-token sample without loss) and the loss
    tokens of the whole optimizer step it belongs to, over all its chunks and ranks."""

    rows: tuple[int, ...]
    step_tokens: int


@dataclass(frozen=True)
class TokenBudget:
    """The run's plan. `lengths`/`counts`: tokens and loss tokens per sample (int64 [n]);
    `step_samples`: samples per optimizer step (batch x ranks x accumulation, as configured);
    `budget`: training.tokens_per_batch; `epochs`: how many the Trainer will start."""

    lengths: np.ndarray
    counts: np.ndarray
    seed: int
    step_samples: int
    ranks: int
    budget: int
    epochs: int

    @classmethod
    def for_run(
        cls, cfg: RunConfig, ranks: int, lengths: np.ndarray, counts: np.ndarray
    ) -> TokenBudget:
        """The plan of a run with training.tokens_per_batch set, over `ranks` data-parallel
        ranks; `lengths`/`counts` per sample of the training split."""
        t = cfg.training
        assert t.tokens_per_batch is not None
        step_samples = t.per_device_train_batch_size * ranks * t.gradient_accumulation_steps
        return cls(
            lengths=lengths,
            counts=counts,
            seed=t.seed,
            step_samples=step_samples,
            ranks=ranks,
            budget=t.tokens_per_batch,
            epochs=token_budget.planned_epochs(
                len(lengths), step_samples, t.max_steps, t.num_train_epochs
            ),
        )

    @cached_property
    def accumulation(self) -> int:
        """K: micro-batches per rank per step, the Trainer's gradient_accumulation_steps."""
        return token_budget.chunks_per_rank(
            self.lengths, self.seed, self.epochs, self.step_samples, self.ranks, self.budget
        )

    def sampler(self) -> TokenBudgetSampler:
        return TokenBudgetSampler(self, self.accumulation)


class TokenBudgetSampler(Sampler[StepChunk]):
    """Every rank's copy yields the same global sequence of StepChunks for an epoch: per
    optimizer step, K x ranks of them (accelerate shards it)."""

    def __init__(self, plan: TokenBudget, accumulation: int) -> None:
        self.plan = plan
        self.accumulation = accumulation
        self.epoch = 0
        self.steps = math.ceil(len(plan.lengths) / plan.step_samples)
        log.info(
            "token budget: %d samples per optimizer step in %d micro-batch(es) of at most %d "
            "tokens per rank", plan.step_samples, accumulation, plan.budget,
        )

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's data loader at each epoch start."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.accumulation * self.plan.ranks

    def __iter__(self) -> Iterator[StepChunk]:
        p = self.plan
        order = seeded_order(len(p.lengths), p.seed, self.epoch)
        # An iteration without set_epoch (HF replays finished epochs that way) moves on too.
        self.epoch += 1
        slots = self.accumulation * p.ranks
        for step in token_budget.steps_of_epoch(order, p.step_samples):
            chunks = token_budget.pack(step, p.lengths, p.budget)
            if len(chunks) > slots:  # only an epoch past the planned ones can get here
                raise RuntimeError(
                    f"a step needs {len(chunks)} micro-batches of at most {p.budget} tokens, "
                    f"more than the {slots} planned for {p.epochs} epoch(s)"
                )
            tokens = int(p.counts[list(step)].sum())
            for i in range(slots):
                yield StepChunk(tuple(chunks[i]) if i < len(chunks) else (), tokens)
