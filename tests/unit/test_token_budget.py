"""Token-budget micro-batches (training.tokens_per_batch): the plan through accelerate's own
batch sharding (every sample once per epoch, none split, each chunk within the budget, the steps
of the run without a budget, the count each step divides by), its determinism and resume
position, and the loss and gradient of one step under two budgets on the embedded tiny Llama."""

from __future__ import annotations

import copy

import datasets
import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
from torch.utils.data import BatchSampler
from transformers import AutoModelForCausalLM, PreTrainedModel

from llmtrain.config import resolve_path
from llmtrain.data import token_budget
from llmtrain.data.sampling import seeded_order
from llmtrain.kernels import varlen_attention
from llmtrain.labels import IGNORE_INDEX
from llmtrain.train import loss_weighting
from llmtrain.train.token_budget import StepChunk, TokenBudget, TokenBudgetSampler


def plan(
    lengths: np.ndarray, step_samples: int, ranks: int, budget: int, epochs: int = 2
) -> TokenBudget:
    counts = np.maximum(lengths - 3, 0)  # a prompt of 3 tokens, the rest with loss
    return TokenBudget(lengths, counts, 7, step_samples, ranks, budget, epochs)


def shard(order: list[StepChunk], ranks: int) -> list[list[StepChunk]]:
    """Each rank's micro-batches, as accelerate 0.26 shards the Trainer's DataLoader
    (batch size 1: one chunk per batch)."""
    return [
        [b[0] for b in BatchSamplerShard(BatchSampler(order, 1, False), ranks, rank)]
        for rank in range(ranks)
    ]


@pytest.mark.parametrize(
    ("rows", "step_samples", "ranks", "budget"),
    [(37, 8, 1, 64), (37, 8, 2, 64), (50, 12, 3, 40), (9, 16, 2, 100), (20, 4, 4, 30)],
)
def test_each_step_holds_its_samples_once_within_the_budget(
    rows: int, step_samples: int, ranks: int, budget: int
) -> None:
    lengths = np.random.default_rng(rows).integers(2, 31, size=rows)
    p = plan(lengths, step_samples, ranks, budget)
    sampler = p.sampler()
    k = p.accumulation
    steps = -(-rows // step_samples)
    assert len(sampler) == steps * k * ranks
    for epoch in range(p.epochs):
        sampler.set_epoch(epoch)
        per_rank = shard(list(sampler), ranks)
        assert {len(r) for r in per_rank} == {steps * k}  # K micro-batches per rank per step
        order = seeded_order(rows, 7, epoch)
        for step in range(steps):
            chunks = [c for r in per_rank for c in r[step * k : (step + 1) * k]]
            seen = [row for c in chunks for row in c.rows]
            # the step holds the samples it holds without a budget, each once, none split
            assert sorted(seen) == sorted(order[step * step_samples : (step + 1) * step_samples])
            assert all(int(lengths[list(c.rows)].sum()) <= budget for c in chunks)
            truth = int(p.counts[seen].sum())
            assert {c.step_tokens for c in chunks} == {truth}
            # the ranks' shares of a step differ by at most one real chunk
            real = [sum(1 for c in r[step * k : (step + 1) * k] if c.rows) for r in per_rank]
            assert max(real) - min(real) <= 1


def test_chunks_fill_up_to_the_budget_in_the_seeded_order() -> None:
    lengths = np.array([5, 5, 5, 9, 1, 10, 10])
    assert token_budget.pack(range(7), lengths, 10) == [[0, 1], [2], [3, 4], [5], [6]]
    assert token_budget.pack([6, 4, 0], lengths, 16) == [[6, 4, 0]]


def test_k_is_what_the_fullest_step_needs() -> None:
    lengths = np.array([30] * 4 + [2] * 60)  # four long samples, wherever the order puts them
    p = plan(lengths, 16, 1, 32, epochs=3)
    needed = [
        len(token_budget.pack(step, lengths, 32))
        for e in range(3)
        for step in token_budget.steps_of_epoch(seeded_order(64, 7, e), 16)
    ]
    assert p.accumulation == max(needed) > min(needed)
    sampler = p.sampler()
    for _ in range(3):  # every step of every planned epoch has its K slots, empties at the end
        items = list(sampler)
        for s in range(len(items) // p.accumulation):
            slots = items[s * p.accumulation : (s + 1) * p.accumulation]
            real = [c for c in slots if c.rows]
            assert slots[: len(real)] == real


def test_same_order_from_the_seed_and_after_a_resume() -> None:
    lengths = np.random.default_rng(0).integers(2, 40, size=45)
    p = plan(lengths, 10, 2, 64)
    first = p.sampler()
    epochs = [list(first) for _ in range(p.epochs)]  # no set_epoch: each iteration moves on
    assert epochs[0] != epochs[1]  # another order, other chunks in the next epoch
    for e in range(p.epochs):  # a fresh process (a resumed run) set to epoch e: same chunks
        again = plan(lengths, 10, 2, 64).sampler()
        again.set_epoch(e)
        assert list(again) == epochs[e]
    # HF's resume skips the micro-batches it trained in the epoch (skip_first_batches)
    resumed = p.sampler()
    resumed.set_epoch(1)
    rank_batches = BatchSamplerShard(BatchSampler(resumed, 1, False), 2, 1)
    skipped = [b[0] for b in SkipBatchSampler(rank_batches, 3 * p.accumulation)]
    assert skipped == shard(epochs[1], 2)[1][3 * p.accumulation :]


def test_an_epoch_past_the_plan_that_needs_more_chunks_is_refused() -> None:
    lengths = np.array([30] * 4 + [2] * 60)
    small = TokenBudgetSampler(plan(lengths, 16, 1, 32, epochs=1), accumulation=1)
    with pytest.raises(RuntimeError, match="more than the 1 planned for 1 epoch"):
        list(small)


def test_planned_epochs_follow_max_steps_or_num_train_epochs() -> None:
    assert token_budget.planned_epochs(100, 8, -1, 2.5) == 3
    assert token_budget.planned_epochs(100, 8, 13, 1.0) == 1  # 13 steps per epoch
    assert token_budget.planned_epochs(100, 8, 14, 1.0) == 2


def test_row_lengths_read_arrow_offsets() -> None:
    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6]], "labels": [[0]] * 3})
    assert token_budget.row_lengths(ds.select([2, 0, 1])).tolist() == [2, 3, 1]


def rows(n: int) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(n):
        length, prompt = 6 + 5 * k % 23, 2 + k % 5
        ids = torch.randint(3, 500, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def one_step(
    model: PreTrainedModel, data: datasets.Dataset, budget: int
) -> tuple[float, torch.Tensor, int]:
    """One optimizer step of all `data` on one rank, as the Trainer makes it under a budget:
    K micro-batches (chunks, one packed row each), each loss divided by K by accelerate.
    Returns the logged loss, the gradient (flattened) and K."""
    dataset = loss_weighting.StepTokenDataset(data)
    p = TokenBudget(token_budget.row_lengths(data), dataset.counts, 3, len(data), 1, budget, 1)
    collate = loss_weighting.StepTokenCollator(varlen_attention.PackingCollator())
    replica = copy.deepcopy(model)
    logged = 0.0
    for chunk in p.sampler():
        batch = collate([dataset[chunk]])
        step_tokens = batch.pop(loss_weighting.STEP_TOKENS)
        loss = loss_weighting.token_loss_sum(replica, batch, False) * (
            loss_weighting.backward_scale(step_tokens, p.accumulation, 1)
        )
        (loss / p.accumulation).backward()
        logged += float(loss.detach()) / p.accumulation
    grad = torch.cat([q.grad.flatten() for q in replica.parameters() if q.grad is not None])
    return logged, grad, p.accumulation


def test_two_budgets_give_the_same_step() -> None:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        resolve_path("embedded:tiny-llama"), torch_dtype=torch.float32
    ).train()
    varlen_attention.patch_attention(model)
    data = datasets.Dataset.from_list(rows(12))
    runs = {budget: one_step(model, data, budget) for budget in (30, 64, 1000)}
    assert [k for _, _, k in runs.values()] == [9, 4, 1]  # micro-batches in the step
    loss, grad, _ = runs[1000]
    for budget, (other_loss, other_grad, _) in runs.items():
        assert other_loss == pytest.approx(loss, rel=1e-5), budget
        assert float((other_grad - grad).norm() / grad.norm()) < 1e-5, budget
    # and that step is the token-weighted mean over the samples, each on its own
    with torch.no_grad():
        per_sample = [
            loss_weighting.token_loss_sum(model, varlen_attention.PackingCollator()([r]), False)
            for r in data
        ]
    tokens = int(loss_weighting.sample_loss_tokens(data).sum())
    assert loss == pytest.approx(float(sum(per_sample)) / tokens, rel=1e-5)


def test_chunks_collate_to_the_samples_packed_in_one_row() -> None:
    data = datasets.Dataset.from_list(rows(5))
    dataset = loss_weighting.StepTokenDataset(data)
    collate = loss_weighting.StepTokenCollator(varlen_attention.PackingCollator())
    batch = collate([dataset[StepChunk((3, 0), 17)]])
    assert batch[loss_weighting.STEP_TOKENS] == 17
    assert batch["input_ids"][0].tolist() == data[3]["input_ids"] + data[0]["input_ids"]
    empty = collate([dataset[StepChunk((), 17)]])
    assert empty["input_ids"].shape == (1, 1)  # an empty chunk: one token without loss
    assert int(loss_weighting.loss_tokens(empty["labels"])) == 0
