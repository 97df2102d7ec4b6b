"""The loss of an optimizer step, weighted by tokens over all its micro-batches and ranks.

transformers 4.37.2 takes the mean loss of each micro-batch, divides it by the gradient
accumulation steps, and DDP/FSDP/DeepSpeed average the gradients of the ranks: a step's loss is
the mean of per-micro-batch means, so a micro-batch with 4 loss tokens weighs as much as one
with 36, and batch 2 != batch 1 x accumulation 2 != 2 ranks x batch 1. transformers 4.46 fixed
this (`num_items_in_batch`, huggingface/transformers#34191, and #34511 for the count over ranks):
it reads the step's micro-batches ahead, counts their loss tokens, gathers the count over ranks,
and divides the summed token loss by it. This module is that fix for 4.37.2; it can go when the
pinned transformers is 4.46 or later (then pass `num_items_in_batch` through instead).

Here the count needs no look-ahead and no collective: the training order is a pure function of
(seed, epoch) on every rank (sampling.EpochSeededSampler), and accelerate hands rank r the
global batches r, r + W, r + 2W, ... (BatchSamplerShard, split_batches=False), so the samples of
optimizer step k are global positions [k * S, (k + 1) * S), S = batch x ranks x accumulation.
Every rank sums the per-sample loss-token counts of that block itself. The order is padded with
empty samples (one token, no loss token) to a multiple of S, so that no step straddles an
epoch's end (4.37.2 carries a partial accumulation group into the next epoch; accelerate would
otherwise repeat samples to even out the ranks) and every rank has the same number of
micro-batches. LossRecorder checks the count against the tokens the ranks really saw, in the
all-reduce it already makes for each log line.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from llmtrain.data.sampling import EpochSeededSampler
from llmtrain.labels import IGNORE_INDEX
from llmtrain.train.token_budget import StepChunk

STEP_TOKENS = "num_items_in_batch"  # transformers 4.46's name for the step's loss-token count
FILLER = -1  # sampler index of an empty sample
SAMPLES = "samples"  # a token-budget chunk's samples (token_budget.StepChunk), before collation


def loss_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Loss tokens of a batch after the causal shift: labels[..., 1:] != -100, summed (int64)."""
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def sample_loss_tokens(dataset: datasets.Dataset) -> np.ndarray:
    """Per sample of a tokenized dataset (a `labels` column of int lists): its loss tokens after
    the causal shift, as the model sees them padded (PadCollator) or packed (PackingCollator
    masks each sample's first label): int64 [len(dataset)]. Read from Arrow, 8192 rows at a time."""
    parts = [np.zeros(0, dtype=np.int64)]
    for table in dataset.select_columns("labels").with_format("arrow").iter(batch_size=8192):
        column = table.column("labels").combine_chunks()
        offsets = np.asarray(column.offsets, dtype=np.int64)
        offsets -= offsets[0]  # a sliced array's offsets point into a longer values buffer
        trained = np.asarray(column.flatten(), dtype=np.int64) != IGNORE_INDEX
        cumsum = np.concatenate([[0], np.cumsum(trained)])
        starts = np.minimum(offsets[:-1] + 1, offsets[1:])  # the first label is never a target
        parts.append(cumsum[offsets[1:]] - cumsum[starts])
    counts: np.ndarray = np.concatenate(parts)
    return counts


class StepItem(NamedTuple):
    """What the sampler yields: a dataset row (FILLER for an empty sample) and the loss
    tokens of the whole optimizer step it belongs to, over all micro-batches and ranks."""

    row: int
    step_tokens: int


class StepTokenSampler(EpochSeededSampler):
    """EpochSeededSampler's order, padded to whole optimizer steps, each index with its step's
    loss-token count. `step_samples`: per-device batch x data-parallel ranks x accumulation."""

    def __init__(self, counts: np.ndarray, seed: int, step_samples: int) -> None:
        super().__init__(len(counts), seed)
        self.counts = counts
        self.step_samples = step_samples

    def __len__(self) -> int:
        return math.ceil(self.length / self.step_samples) * self.step_samples

    def __iter__(self) -> Iterator[StepItem]:  # type: ignore[override]
        order = list(super().__iter__())
        order += [FILLER] * (len(self) - len(order))
        for start in range(0, len(order), self.step_samples):
            block = order[start : start + self.step_samples]
            tokens = int(sum(self.counts[i] for i in block if i != FILLER))
            yield from (StepItem(i, tokens) for i in block)


class StepTokenDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """The training split read through StepItems: each sample carries its step's count;
    FILLER is a one-token sample without a loss token (it changes no gradient). Read through
    a StepChunk (a token-budget micro-batch), an item is the chunk's samples under SAMPLES (an
    empty chunk: one FILLER sample), each with the step's count."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.counts = sample_loss_tokens(base)
        self.filler_id = int(base[0]["input_ids"][0]) if len(base) else 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: StepItem | StepChunk) -> dict[str, Any]:
        if isinstance(item, StepChunk):
            rows = [self[StepItem(r, item.step_tokens)] for r in item.rows or (FILLER,)]
            return {SAMPLES: rows, STEP_TOKENS: item.step_tokens}
        if item.row == FILLER:
            row: dict[str, Any] = {"input_ids": [self.filler_id], "labels": [IGNORE_INDEX]}
        else:
            row = dict(self.base[item.row])
        row[STEP_TOKENS] = item.step_tokens
        return row


@dataclass
class StepTokenCollator:
    """Batches with `inner`, adding the step's loss-token count (int) when the samples carry
    one (training); evaluation batches pass through unchanged. Token-budget chunks (SAMPLES)
    are batched as their samples."""

    inner: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        features = [s for f in features for s in f.get(SAMPLES, [f])]
        counts = {f.pop(STEP_TOKENS) for f in features if STEP_TOKENS in f}
        batch = self.inner(features)
        if counts:
            if len(counts) != 1:
                raise RuntimeError(f"one micro-batch spans optimizer steps: counts {counts}")
            batch[STEP_TOKENS] = counts.pop()
        return batch


def token_loss_sum(model: Any, inputs: dict[str, Any], chunked: bool) -> torch.Tensor:
    """Summed next-token cross-entropy of a batch (fp32 scalar), through the chunked loss when
    it is patched in (fused_loss), else from the logits the model returns.

    Training never reads a KV cache, so none is built, whatever the model's config says (the
    chunked loss does the same; transformers 5.x's Trainer also sets config.use_cache from its
    arguments, other callers do not). On transformers 5.x a cache also switches off the mask
    that keeps the samples of a packed row (restarting position_ids, no attention_mask) apart:
    a row's loss would depend on which samples share it, and a token-budget step's on its
    budget."""
    if chunked:
        loss: torch.Tensor = model(**inputs, loss_reduction="sum").loss
        return loss
    labels = inputs["labels"]
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
    return F.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]).float(),
        labels[..., 1:].reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def backward_scale(step_tokens: int, accumulation: int, ranks: int) -> float:
    """Factor on a micro-batch's summed token loss: accelerate divides the loss by the
    accumulation steps (DeepSpeed's engine does the same) and DDP/FSDP/DeepSpeed average the
    ranks' gradients, so the step's gradient becomes that of sum(token losses) / step_tokens.
    A step without any loss token (only possible with such data) trains nothing."""
    return accumulation * ranks / max(step_tokens, 1)
