"""Several datasets in one run: each read with its own keys, held out, then sampled.

Each source's held-out rows (data.eval_fraction) are split off first, so a row never lands in
both splits however often it is repeated. Its training rows are then taken `rows` times or
`weight` x its size: a seeded permutation, repeated when more rows are asked for than it has,
so the mixture is a pure function of the seed and the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import datasets
import numpy as np

from llmtrain.config import DataSection, SourceSection
from llmtrain.data.rows import SOURCE_ROW, load_rows
from llmtrain.errors import DataError


@dataclass
class SourceRows:
    index: int
    section: DataSection  # the source's keys over the data section's
    train: datasets.Dataset
    held_out: datasets.Dataset | None

    @property
    def label(self) -> str:
        return f"source {self.index} ({self.section.path})"


def take(rows: datasets.Dataset, source: SourceSection | None, seed: int) -> datasets.Dataset:
    """The training rows a source contributes: all of them once, `rows`, or `weight` x n."""
    if source is None or (source.rows is None and source.weight is None):
        return rows
    wanted = source.rows if source.rows is not None else round((source.weight or 1.0) * len(rows))
    wanted = max(wanted, 1)
    rng = np.random.default_rng(seed)
    order = np.concatenate(
        [rng.permutation(len(rows)) for _ in range(math.ceil(wanted / len(rows)))]
    )
    return rows.select(order[:wanted].tolist())


def splits_rows(section: DataSection) -> bool:
    """Whether the held-out part is taken from rows (instruction and chat: they are answered
    as prompts later) or, for plain text, from the tokenized samples or blocks: one long
    document is one row but many blocks."""
    return section.shape != "text"


def check_eval_split(data: DataSection, k: int, n_rows: int) -> None:
    """data.eval_fraction of source `k`'s `n_rows` holds out a row and keeps one to train on
    (plain text is split later, after tokenizing: see splits_rows).

    Raises:
        DataError: it would not (exit 65).
    """
    if not splits_rows(data.for_sources()[k]):
        return
    if data.eval_fraction > 0 and (n_rows < 2 or int(n_rows * data.eval_fraction) < 1):
        where = f"data.sources[{k}]" if data.sources else "data.path"
        raise DataError(
            f"data.eval_fraction={data.eval_fraction} of the {n_rows} rows of "
            f"{where} leaves no evaluation row",
            "set data.eval_fraction=0, or give more rows (plain text splits into rows "
            "at blank lines)",
        )


def split_sources(data: DataSection, seed: int) -> list[SourceRows]:
    """Every source of the run, read, split and sampled.

    Raises:
        DataError: a source has too few rows for data.eval_fraction (exit 65), or the
            readers' errors (see data.load_rows).
    """
    out = []
    for k, section in enumerate(data.for_sources()):
        rows = load_rows(section)
        rows = rows.add_column(SOURCE_ROW, list(range(len(rows))))
        held_out = None
        if data.eval_fraction > 0 and splits_rows(section):
            check_eval_split(data, k, len(rows))
            parts = rows.train_test_split(test_size=data.eval_fraction, seed=seed)
            rows, held_out = parts["train"], parts["test"]
        source = data.sources[k] if data.sources else None
        out.append(SourceRows(k, section, take(rows, source, seed + k), held_out))
    return out
