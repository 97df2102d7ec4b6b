"""Several datasets in one run: each read with its own keys, held out, then sampled.

Each source's held-out rows (data.eval_fraction) are split off first, so a row never lands in
both splits however often it is repeated, by the mixture or in the file: rows the model reads
alike (the same values in the columns it reads, whatever their other columns hold) go to
the side of their first copy. Its training rows are then taken `rows` times or `weight` x its
size: a seeded permutation, repeated when more rows are asked for than it has, so the mixture
is a pure function of the seed and the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass

import datasets
import numpy as np

from llmtrain.config import DataSection, SourceSection
from llmtrain.data import preference
from llmtrain.data.rows import SOURCE_ROW, load_rows
from llmtrain.data.templates import TemplateError, fields
from llmtrain.errors import DataError

log = logging.getLogger(__name__)


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


def read_columns(section: DataSection, columns: list[str]) -> list[str]:
    """The columns whose values the model reads: the templates' fields (instruction), the
    turns (chat), the text field; every column where that cannot be told."""
    if section.shape == "instruction" and section.prompt_template and section.response_template:
        try:
            wanted = set(fields(section.prompt_template + section.response_template))
        except TemplateError:  # refused with its own message by rows.check_templates
            wanted = set()
    elif section.shape == "chat":  # the turns; a preference pair's shared turns and answers
        shared = preference.SHARED_COLUMNS  # messages, conversations, prompt
        wanted = {section.messages_field} if section.messages_field else set(shared)
        wanted |= set(preference.SIDES)
    else:
        wanted = {section.text_field}
    read = [c for c in columns if c in wanted]
    return read or [c for c in columns if c != SOURCE_ROW]


def row_keys(rows: datasets.Dataset, section: DataSection) -> list[str]:
    """A digest of each row's values in the columns the model reads (read_columns): equal for
    rows the model reads alike. A column no template reads (an id, a source name) differed
    between copies of a row, and one copy was held out while another was trained."""
    columns = read_columns(section, [c for c in rows.column_names if c != SOURCE_ROW])
    keys = []
    for batch in rows.select_columns(columns).iter(batch_size=1000):
        n = len(batch[columns[0]]) if columns else 0
        for i in range(n):
            values = json.dumps([batch[c][i] for c in columns], ensure_ascii=False, default=str)
            keys.append(hashlib.sha256(values.encode()).hexdigest())
    return keys


def distinct_rows(rows: datasets.Dataset, section: DataSection) -> int:
    return len(set(row_keys(rows, section)))


def held_out_split(
    rows: datasets.Dataset, fraction: float, seed: int, keys: list[str]
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training rows, held-out rows): `fraction` of the distinct rows held out by HF datasets'
    seeded train_test_split, every copy of a row on the side of its first copy. A row repeated
    in the data was held out and trained on at once, so the held-out loss and the answers
    `generate` scores included trained text. Without repeats, the split is train_test_split's.

    Args:
        rows: with the SOURCE_ROW column (each row's index in `rows`).
        keys: row_keys(rows, section) of the source.
    """
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    if len(first) == len(keys):
        parts = rows.train_test_split(test_size=fraction, seed=seed)
        return parts["train"], parts["test"]
    log.info("%d rows repeat an earlier row: each copy is held out or trained as its first",
             len(keys) - len(first))  # fmt: skip
    parts = rows.select(list(first.values())).train_test_split(test_size=fraction, seed=seed)
    held = {keys[i] for i in parts["test"][SOURCE_ROW]}
    train = [i for i, key in enumerate(keys) if key not in held]
    test = [i for i, key in enumerate(keys) if key in held]
    return rows.select(train), rows.select(test)


def check_eval_split(data: DataSection, k: int, n_rows: int) -> None:
    """data.eval_fraction of source `k`'s `n_rows` distinct rows holds out a row and keeps one
    to train on (plain text is split later, after tokenizing: see splits_rows).

    Raises:
        DataError: it would not (exit 65).
    """
    if not splits_rows(data.for_sources()[k]):
        return
    if data.eval_fraction > 0 and (n_rows < 2 or int(n_rows * data.eval_fraction) < 1):
        where = f"data.sources[{k}]" if data.sources else "data.path"
        raise DataError(
            f"data.eval_fraction={data.eval_fraction} of the {n_rows} distinct rows of "
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
            keys = row_keys(rows, section)
            check_eval_split(data, k, len(set(keys)))
            rows, held_out = held_out_split(rows, data.eval_fraction, seed, keys)
        source = data.sources[k] if data.sources else None
        out.append(SourceRows(k, section, take(rows, source, seed + k), held_out))
    return out
