"""Rows -> token ids and labels, with the loss on responses only (see encode.py for the
boundary rule); too-long, empty and blank rows are counted in TokenizeStats."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import datasets

from llmtrain.config import DataSection
from llmtrain.data import chat
from llmtrain.data.encode import Encoded, encode
from llmtrain.data.rows import row_location
from llmtrain.data.special_text import SpecialText
from llmtrain.data.templates import (
    TemplateError,
    blank_fields,
    field_values,
    is_missing,
    placeholders,
    render,
)
from llmtrain.errors import DataError
from llmtrain.labels import IGNORE_INDEX
from llmtrain.vocab import special_tokens


@dataclass
class TokenizeStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_prompt_too_long: int = 0
    dropped_empty: int = 0
    dropped_special: int = 0  # data.special_tokens_in_text=drop
    tokens: int = 0
    loss_tokens: int = 0
    empty_fields: dict[str, int] = field(default_factory=dict)  # placeholder -> rows blank
    extra: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        text = (
            f"{self.kept}/{self.rows} rows kept ({self.truncated} truncated, "
            f"{self.dropped_too_long} dropped as too long, {self.dropped_prompt_too_long} dropped "
            f"because the prompt fills max_length, {self.dropped_empty} dropped with an empty "
            f"response"
            + (
                f", {self.dropped_special} dropped holding a special token's text"
                if self.dropped_special
                else ""
            )
            + f"); {self.tokens} tokens, {self.loss_tokens} with loss"
        )
        if self.empty_fields:
            counts = ", ".join(f"{{{k}}}: {v}" for k, v in sorted(self.empty_fields.items()))
            text += f"; rows with an empty or missing field (rendered as empty text): {counts}"
        return text


def _fit(ex: Encoded, cfg: DataSection, stats: TokenizeStats) -> Encoded | None:
    """Apply data.max_length and data.overflow to one sample, counting what happens."""
    if ex.first_trained >= min(len(ex.input_ids), cfg.max_length):
        stats.dropped_prompt_too_long += 1
        return None
    if len(ex.input_ids) <= cfg.max_length:
        return ex
    if cfg.overflow == "drop":
        stats.dropped_too_long += 1
        return None
    stats.truncated += 1
    n = cfg.max_length
    return Encoded(ex.input_ids[:n], ex.labels[:n], ex.first_trained)


def _instruction_batch(
    batch: list[dict[str, Any]],
    first_row: int,
    cfg: DataSection,
    stats: TokenizeStats,
    special_text: SpecialText,
) -> list[tuple[str, int]]:
    """(full text, where the response starts) per kept row. Counts rows without a response
    (dropped_empty), rows left out by data.special_tokens_in_text (dropped_special), and each
    template placeholder left blank (empty_fields)."""
    assert cfg.prompt_template is not None and cfg.response_template is not None
    response_fields = set(placeholders(cfg.response_template))
    out: list[tuple[str, int]] = []
    for i, row in enumerate(batch):
        where = functools.partial(row_location, cfg, row, first_row + i)
        try:
            prompt = render(cfg.prompt_template, row)
            response = render(cfg.response_template, row)
        except TemplateError as exc:
            raise DataError(
                f"{where()}: {exc}",
                "fix the data, or change data.prompt_template / data.response_template",
            ) from None
        blank = set(blank_fields(cfg.prompt_template + cfg.response_template, row))
        for name in blank:
            stats.empty_fields[name] = stats.empty_fields.get(name, 0) + 1
        # " {answer}" with a null answer renders as " ": empty all the same.
        if not response.strip() or (bool(response_fields) and response_fields <= blank):
            stats.dropped_empty += 1
            continue
        values = field_values(cfg.prompt_template, row) + field_values(cfg.response_template, row)
        if not special_text.keeps(values, where):
            stats.dropped_special += 1
            continue
        out.append((prompt + response, len(prompt)))
    return out


def _text_batch(
    batch: list[dict[str, Any]],
    first_row: int,
    cfg: DataSection,
    stats: TokenizeStats,
    special_text: SpecialText,
) -> list[str]:
    """The text of each kept row; counts empty ones and those data.special_tokens_in_text
    leaves out."""
    out: list[str] = []
    for i, row in enumerate(batch):
        v = row[cfg.text_field]
        where = functools.partial(row_location, cfg, row, first_row + i)
        if not (is_missing(v) or isinstance(v, str)):
            raise DataError(
                f"{where()}: data.text_field {cfg.text_field!r} holds a "
                f"{type(v).__name__}, not text",
                "point data.text_field at a column of text",
            )
        if is_missing(v) or not v.strip():
            stats.dropped_empty += 1
        elif not special_text.keeps([(f"data.text_field {cfg.text_field!r}", v)], where):
            stats.dropped_special += 1
        else:
            out.append(v)
    return out


def _chat_rendered(
    row: dict[str, Any],
    where: Callable[[], str],
    field_name: str,
    tokenizer: Any,
    template: str,
    cfg: DataSection,
    stats: TokenizeStats,
    special_text: SpecialText,
) -> tuple[list[chat.Message], chat.Rendered] | None:
    """One row's conversation and its rendering; None when data.special_tokens_in_text leaves
    it out (counted)."""
    messages = chat.conversation(row[field_name], cfg, where)
    if not special_text.keeps(chat.contents(messages), where):
        stats.dropped_special += 1
        return None
    return messages, rendered(tokenizer, template, messages, cfg.train_on, where)


def rendered(
    tokenizer: Any,
    template: str,
    messages: list[chat.Message],
    train_on: str,
    where: Callable[[], str],
) -> chat.Rendered:
    """chat.render_with_spans for one row's conversation (SFT's, or one side of a preference
    pair), the template's refusal as bad data.

    Raises:
        DataError: the chat template refused the conversation (exit 65).
        ConfigError: as chat.render_with_spans (exit 64).
    """
    try:
        return chat.render_with_spans(tokenizer, template, messages, train_on)
    except chat.TemplateRefused as exc:
        raise DataError(
            f"{where()}: the chat template refused the conversation: {exc}",
            "fix the conversation (e.g. roles must alternate for llama-2 and mistral)",
        ) from None


def _chat_batch(
    batch: list[dict[str, Any]],
    first_row: int,
    tokenizer: Any,
    special: special_tokens.SpecialTokens,
    cfg: DataSection,
    stats: TokenizeStats,
    special_text: SpecialText,
    out: dict[str, list[list[int]]],
) -> None:
    """Conversations -> samples; an over-long one keeps its longest run of whole turns that
    fits (data.overflow=truncate) or is dropped."""
    template = chat.resolve_template(tokenizer, cfg)
    field_name = chat.messages_field(cfg, list(batch[0]) if batch else [])
    for i, row in enumerate(batch):
        where = functools.partial(row_location, cfg, row, first_row + i)
        found = _chat_rendered(
            row, where, field_name, tokenizer, template, cfg, stats, special_text
        )
        if found is None:
            continue
        messages, rendered = found
        ex = encode([rendered.text], [rendered.spans], tokenizer, special, add_eos=False)[0]
        if len(ex.input_ids) > cfg.max_length:
            ex_fit = _shorter_conversation(messages, tokenizer, template, special, cfg)
            if ex_fit is None or cfg.overflow == "drop":
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            ex = ex_fit
        if ex.first_trained >= len(ex.input_ids):
            stats.dropped_empty += 1
            continue
        out["input_ids"].append(ex.input_ids)
        out["labels"].append(ex.labels)


def _shorter_conversation(
    messages: list[chat.Message],
    tokenizer: Any,
    template: str,
    special: special_tokens.SpecialTokens,
    cfg: DataSection,
) -> Encoded | None:
    """The conversation cut after its last assistant turn that still fits data.max_length;
    None when none fits, or with data.train_on=last_assistant: a cut conversation ends at an
    earlier assistant turn, which that setting says not to train on."""
    if cfg.train_on == "last_assistant":
        return None
    cuts = [k + 1 for k, m in enumerate(messages) if m["role"] == "assistant"]
    for cut in reversed(cuts[:-1]):
        rendered = chat.render_with_spans(tokenizer, template, messages[:cut], cfg.train_on)
        ex = encode([rendered.text], [rendered.spans], tokenizer, special, add_eos=False)[0]
        if len(ex.input_ids) <= cfg.max_length:
            return ex
    return None


def tokenize(
    ds: datasets.Dataset, tokenizer: Any, cfg: DataSection
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Rows -> {input_ids, labels} with the special-token policy of special_tokens.decide.

    Instruction rows: input_ids are the tokenization of prompt + response as one text, plus
    BOS/EOS; labels are -100 over the tokens wholly inside the prompt. Text rows: every token
    is trained. Rows whose response is empty or missing are dropped and counted.

    Raises:
        DataError: a row does not fit the templates (a missing field, a list where text is
            expected), holds a special token's text under data.special_tokens_in_text=refuse,
            or no row is left (exit 65).
    """
    special = special_tokens.decide(tokenizer)
    special_text = SpecialText(tokenizer, cfg.special_tokens_in_text)
    stats = TokenizeStats(rows=len(ds))
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for start, batch in _chunks(ds):
        if cfg.shape == "chat":
            _chat_batch(batch, start, tokenizer, special, cfg, stats, special_text, out)
            continue
        if cfg.shape == "instruction":
            texts = _instruction_batch(batch, start, cfg, stats, special_text)
            spans = [[(cut, len(text))] for text, cut in texts]
        else:
            kept = _text_batch(batch, start, cfg, stats, special_text)
            texts = [(v, 0) for v in kept]
            spans = [[(0, len(v))] for v in kept]
        if not texts:
            continue
        encoded = encode([t for t, _ in texts], spans, tokenizer, special)
        for ex in encoded:
            if cfg.shape == "text" and cfg.packing != "none":
                fitted: Encoded | None = ex  # blocks and padding-free rows are cut later
            else:
                fitted = _fit(ex, cfg, stats)
            if fitted is not None:
                out["input_ids"].append(fitted.input_ids)
                out["labels"].append(fitted.labels)
    special_text.check()
    if cfg.packing == "blocks":
        out = _pack_blocks(out["input_ids"], cfg.max_length, stats)
    stats.kept = len(out["input_ids"])
    stats.tokens = sum(len(x) for x in out["input_ids"])
    stats.loss_tokens = sum(sum(1 for t in x if t != IGNORE_INDEX) for x in out["labels"])
    if stats.kept == 0:
        hint = (
            "raise data.max_length above the prompt length or shorten data.prompt_template"
            if stats.dropped_prompt_too_long
            else "check the data and data.max_length / data.overflow"
        )
        raise DataError(f"no usable rows: {stats.summary()}", hint)
    return datasets.Dataset.from_dict(out), stats


def _chunks(ds: datasets.Dataset, size: int = 1000) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(index of the first row, rows as dicts) for each run of `size` rows."""
    for start in range(0, len(ds), size):
        rows = ds[start : start + size]
        n = len(next(iter(rows.values())))
        yield start, [{k: rows[k][i] for k in rows} for i in range(n)]


def check_rows(ds: datasets.Dataset, tokenizer: Any, cfg: DataSection) -> tuple[list[int], int]:
    """What tokenize checks of each row, without tokenizing: templates and conversations
    render, fields are text, and data.special_tokens_in_text. `validate` runs it on every row
    and tokenizes a sample, so it refuses every row that prepare and finetune refuse; prepare
    keeps for `generate` only the held-out rows it keeps.

    Returns:
        the indices of the rows kept (not empty, not left out by data.special_tokens_in_text=
        drop), and how many that setting left out.

    Raises:
        DataError: as tokenize, for the first such row (exit 65).
        ConfigError: as tokenize (a chat template that cannot run, exit 64).
    """
    special_text = SpecialText(tokenizer, cfg.special_tokens_in_text)
    stats = TokenizeStats()
    kept: list[int] = []
    template = chat.resolve_template(tokenizer, cfg) if cfg.shape == "chat" else ""
    for start, batch in _chunks(ds):
        field_name = chat.messages_field(cfg, list(batch[0])) if cfg.shape == "chat" else ""
        for i, row in enumerate(batch):
            if cfg.shape == "instruction":
                found = bool(_instruction_batch([row], start + i, cfg, stats, special_text))
            elif cfg.shape == "text":
                found = bool(_text_batch([row], start + i, cfg, stats, special_text))
            else:
                where = functools.partial(row_location, cfg, row, start + i)
                found = _chat_rendered(
                    row, where, field_name, tokenizer, template, cfg, stats, special_text
                ) is not None
            if found:
                kept.append(start + i)
    special_text.check()
    return kept, stats.dropped_special


def _pack_blocks(
    docs: list[list[int]], block: int, stats: TokenizeStats
) -> dict[str, list[list[int]]]:
    """Concatenate documents (each already ends with EOS) and cut fixed-size blocks."""
    flat = [t for doc in docs for t in doc]
    n = len(flat) // block
    stats.extra["packed_from_documents"] = len(docs)
    stats.extra["tail_tokens_dropped"] = len(flat) - n * block
    blocks = [flat[i * block : (i + 1) * block] for i in range(n)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}
