"""The estimate counts a micro-batch's tokens from the data's measured lengths (prepared data or
validate's tokenized rows) and the token budget, not from data.max_length: a set of short rows
gets the activations of its own largest micro-batch, as the seeded order draws it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pytest

from llmtrain.config import load_config
from llmtrain.data import prepared, token_budget
from llmtrain.data.sampling import seeded_order
from llmtrain.labels import IGNORE_INDEX
from llmtrain.verbs import estimate
from tests.conftest import REPO

BATCH, MAX_LENGTH = 16, 512


def short_rows(path: Path) -> np.ndarray:
    """A prepared train split of 100 rows of 20-60 tokens (max_length 512); their lengths."""
    lengths = np.random.default_rng(0).integers(20, 61, size=100)
    ids = [[5] * int(n) for n in lengths]
    labels = [[IGNORE_INDEX] * 4 + row[4:] for row in ids]
    datasets.Dataset.from_dict({"input_ids": ids, "labels": labels}).save_to_disk(
        str(path / "train")
    )
    info = {"fingerprint": "test", "stats": {}, "splits": ["train"]}
    (path / prepared.INFO).write_text(json.dumps(info))
    return lengths


def report(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [f"output.dir={tmp_path}", f"data.max_length={MAX_LENGTH}",
         f"training.per_device_train_batch_size={BATCH}", "training.max_steps=12", *overrides],
    )  # fmt: skip
    args = argparse.Namespace(
        nodes=1, gpus_per_node=1, gpu="h100", attention="sdpa", tokens=None, mfu=0.4
    )
    return estimate.report(cfg, args)


def activations(rep: dict[str, Any]) -> int:
    value: int = rep["this_run"]["breakdown_bytes"]["activations"]
    return value


@pytest.mark.parametrize("budget", [None, 600])
def test_packed_activation_tokens_follow_the_measured_lengths(
    tmp_path: Path, budget: int | None
) -> None:
    extra = ["data.packing=padding_free"]
    if budget:
        extra.append(f"training.tokens_per_batch={budget}")
    guessed = report(tmp_path, *extra)  # no prepared data yet: every sample max_length long
    assert guessed["tokens_from"] == "data.max_length"
    assert guessed["run"]["tokens"] == (budget or BATCH * MAX_LENGTH)

    lengths = short_rows(tmp_path / "prepared")
    rep = report(tmp_path, *extra)
    assert rep["tokens_from"] == "100 prepared samples"
    epochs = 2  # 12 steps of 16 samples: 7 per epoch
    orders = [seeded_order(100, 42, e) for e in range(epochs)]
    if budget is None:  # each micro-batch: 16 consecutive samples of the order, packed
        largest = max(
            int(lengths[o[i : i + BATCH]].sum()) for o in orders for i in range(0, 100, BATCH)
        )
    else:
        largest = max(
            int(lengths[chunk].sum())
            for o in orders
            for step in token_budget.steps_of_epoch(o, BATCH)
            for chunk in token_budget.pack(step, lengths, budget)
        )
    assert rep["run"]["tokens"] == largest < (budget or BATCH * 60)
    # activations scale with the tokens (no padding mask for packed rows)
    ratio = largest / guessed["run"]["tokens"]
    assert activations(rep) == pytest.approx(ratio * activations(guessed), rel=1e-6)
    assert "largest packed micro-batch" in rep["micro_batch"]


def test_padded_batches_are_as_wide_as_the_longest_sample(tmp_path: Path) -> None:
    guessed = report(tmp_path)
    lengths = short_rows(tmp_path / "prepared")
    rep = report(tmp_path)
    width = -(-int(lengths.max()) // 8) * 8
    assert (rep["run"]["seq_len"], rep["run"]["tokens"]) == (width, BATCH * width)
    assert activations(rep) < activations(guessed) * width / MAX_LENGTH  # the mask shrinks too
    # compute: max_steps x samples per step x the mean measured length
    assert rep["compute"]["tokens"] == pytest.approx(12 * BATCH * lengths.mean())
