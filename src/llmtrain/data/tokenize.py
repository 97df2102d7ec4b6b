"""Rows -> token ids and labels, with the loss on responses only (see encode.py for the
boundary rule); too-long, empty and blank rows are counted in TokenizeStats."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import datasets

from llmtrain.config import DataSection
from llmtrain.data import chat
from llmtrain.data.encode import Encoded, encode
from llmtrain.data.rows import row_location
from llmtrain.data.templates import (
    TemplateError,
    blank_fields,
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
    tokens: int = 0
    loss_tokens: int = 0
    empty_fields: dict[str, int] = field(default_factory=dict)  # placeholder -> rows blank
    extra: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        text = (
            f"{self.kept}/{self.rows} rows kept ({self.truncated} truncated, "
            f"{self.dropped_too_long} dropped as too long, {self.dropped_prompt_too_long} dropped "
            f"because the prompt fills max_length, {self.dropped_empty} dropped with an empty "
            f"response); {self.tokens} tokens, {self.loss_tokens} with loss"
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
    batch: list[dict[str, Any]], first_row: int, cfg: DataSection, stats: TokenizeStats
) -> list[tuple[str, int] | None]:
    """(full text, where the response starts) per row; None for a row without a response.
    Counts each template placeholder left blank into stats.empty_fields."""
    assert cfg.prompt_template is not None and cfg.response_template is not None
    response_fields = set(placeholders(cfg.response_template))
    out: list[tuple[str, int] | None] = []
    for i, row in enumerate(batch):
        try:
            prompt = render(cfg.prompt_template, row)
            response = render(cfg.response_template, row)
        except TemplateError as exc:
            raise DataError(
                f"{row_location(cfg, row, first_row + i)}: {exc}",
                "fix the data, or change data.prompt_template / data.response_template",
            ) from None
        blank = set(blank_fields(cfg.prompt_template + cfg.response_template, row))
        for name in blank:
            stats.empty_fields[name] = stats.empty_fields.get(name, 0) + 1
        # " {answer}" with a null answer renders as " ": empty all the same.
        empty = not response.strip() or (bool(response_fields) and response_fields <= blank)
        out.append(None if empty else (prompt + response, len(prompt)))
    return out


def _chat_batch(
    batch: list[dict[str, Any]],
    first_row: int,
    tokenizer: Any,
    special: special_tokens.SpecialTokens,
    cfg: DataSection,
    stats: TokenizeStats,
    out: dict[str, list[list[int]]],
) -> None:
    """Conversations -> samples; an over-long one keeps its longest run of whole turns that
    fits (data.overflow=truncate) or is dropped."""
    template = chat.resolve_template(tokenizer, cfg)
    field_name = chat.messages_field(cfg, list(batch[0]) if batch else [])
    for i, row in enumerate(batch):
        where = functools.partial(row_location, cfg, row, first_row + i)
        messages = chat.conversation(row[field_name], cfg, where)
        try:
            rendered = chat.render_with_spans(tokenizer, template, messages, cfg.train_on)
        except chat.TemplateRefused as exc:
            raise DataError(
                f"{where()}: the chat template refused the "
                f"conversation: {exc}",
                "fix the conversation (e.g. roles must alternate for llama-2 and mistral)",
            ) from None
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
            expected), or no row is left (exit 65).
    """
    special = special_tokens.decide(tokenizer)
    stats = TokenizeStats(rows=len(ds))
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    chunk = 1000
    for start in range(0, len(ds), chunk):
        rows = ds[start : start + chunk]
        n = len(next(iter(rows.values())))
        batch = [{k: rows[k][i] for k in rows} for i in range(n)]
        if cfg.shape == "chat":
            _chat_batch(batch, start, tokenizer, special, cfg, stats, out)
            continue
        if cfg.shape == "instruction":
            assert cfg.prompt_template is not None and cfg.response_template is not None
            rendered = _instruction_batch(batch, start, cfg, stats)
            stats.dropped_empty += sum(r is None for r in rendered)
            texts = [r for r in rendered if r is not None]
            spans = [[(cut, len(text))] for text, cut in texts]
        else:
            values = [r[cfg.text_field] for r in batch]
            for i, v in enumerate(values):
                if not (is_missing(v) or isinstance(v, str)):
                    raise DataError(
                        f"{row_location(cfg, batch[i], start + i)}: data.text_field "
                        f"{cfg.text_field!r} holds a "
                        f"{type(v).__name__}, not text",
                        "point data.text_field at a column of text",
                    )
            kept = [v for v in values if not is_missing(v) and v.strip()]
            stats.dropped_empty += len(values) - len(kept)
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
