"""Reading datasets into rows, and turning rows into token ids with the loss on responses only."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from llmtrain import chat, special_tokens
from llmtrain.config import DataSection
from llmtrain.encode import Encoded, encode
from llmtrain.errors import ConfigError, DataError
from llmtrain.labels import IGNORE_INDEX
from llmtrain.templates import (
    TemplateError,
    blank_fields,
    fields,
    is_missing,
    placeholders,
    render,
)

__all__ = ["IGNORE_INDEX", "TokenizeStats", "load_rows", "tokenize"]
_SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}


def detect_format(cfg: DataSection) -> str:
    if cfg.format != "auto":
        return cfg.format
    path = Path(cfg.resolved_path())
    if path.is_dir():
        return "disk"
    if path.suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[path.suffix]
    if path.exists():
        raise ConfigError(
            f"data.path {cfg.path!r}: cannot tell the format from the suffix {path.suffix!r}",
            "set data.format to one of json, jsonl, csv, parquet, text, squad, disk",
        )
    return "hub"


def check_exists(cfg: DataSection, fmt: str) -> None:
    path = Path(cfg.resolved_path())
    if fmt != "hub" and not path.exists():
        raise ConfigError(
            f"data.path {cfg.path!r} does not exist",
            "point data.path at a JSON/JSONL/CSV/Parquet/text file, a save_to_disk directory, "
            "or a hub dataset name (with data.format=hub)",
        )


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})",
                    "fix or remove that line; each line must be one JSON object",
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: line {lineno} is a JSON {type(row).__name__}, not an object",
                    'each line must be an object like {"question": ..., "answer": ...}',
                )
            yield row


def squad_records(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten SQuAD-format JSON (also JSQuAD's layout) into one record per question."""
    records = []
    for article in doc.get("data", []):
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = qa.get("answers", [])
                records.append(
                    {
                        "id": qa.get("id"),
                        "title": article.get("title", ""),
                        "context": paragraph.get("context", ""),
                        "question": qa.get("question", ""),
                        "answers": {
                            "text": [a.get("text", "") for a in answers],
                            "answer_start": [a.get("answer_start", -1) for a in answers],
                        },
                        "is_impossible": qa.get("is_impossible", not answers),
                    }
                )
    return records


def _read_json(path: Path, fmt: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            "fix the file; for one object per line name it .jsonl",
        ) from None
    if isinstance(doc, dict) and isinstance(doc.get("data"), list) and fmt in ("json", "squad"):
        return squad_records(doc)
    if isinstance(doc, list) and all(isinstance(r, dict) for r in doc):
        return doc
    raise DataError(
        f"{path}: JSON must be a list of objects or SQuAD-format {{'data': [...]}}",
        "reshape the file, or use JSONL with one object per line",
    )


def load_rows(cfg: DataSection) -> datasets.Dataset:
    """The configured split as a datasets.Dataset, before tokenization."""
    fmt = detect_format(cfg)
    check_exists(cfg, fmt)
    path = Path(cfg.resolved_path())
    if fmt == "jsonl":
        ds = datasets.Dataset.from_list(list(_read_jsonl(path)))
    elif fmt in ("json", "squad"):
        ds = datasets.Dataset.from_list(_read_json(path, fmt))
    elif fmt in ("csv", "parquet"):
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    elif fmt == "text":
        ds = datasets.load_dataset(
            "text", data_files=str(path), split="train", sample_by="paragraph"
        )
    elif fmt == "disk":
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise ConfigError(
                    f"data.split {cfg.split!r} is not in {cfg.path!r} (has: {', '.join(loaded)})",
                    "set data.split to one of those",
                )
            loaded = loaded[cfg.split]
        ds = loaded
    else:
        try:
            ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split)
        except (FileNotFoundError, ConnectionError, ValueError) as exc:
            raise ConfigError(
                f"hub dataset {cfg.path!r} could not be loaded: {exc}",
                "check the name, or cache it under HF_HOME while online, or use a local file",
            ) from None
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    if len(ds) == 0:
        raise DataError(f"data.path {cfg.path!r} holds no rows", "point it at a non-empty dataset")
    return ds


# Set by prepared.prepare before the held-out split shuffles rows, so errors name the row
# (and the JSONL line) of the source file, not a position in a split.
SOURCE_ROW = "__llmtrain_source_row"


def row_location(cfg: DataSection, row: dict[str, Any], fallback: int) -> str:
    """Where a row came from: `NAME.jsonl line N` for JSONL files, else `row N` (1-based)."""
    index = row.get(SOURCE_ROW, fallback)
    path = Path(cfg.resolved_path())
    if path.suffix == ".jsonl" and path.is_file():
        with path.open(encoding="utf-8", errors="replace") as f:
            seen = 0
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    if seen == index:
                        return f"{path.name} line {lineno}"
                    seen += 1
    return f"row {index + 1}"


def check_templates(cfg: DataSection, ds: datasets.Dataset) -> None:
    """Every field the templates use exists in the data, and the first rows render."""
    if cfg.shape == "chat":
        chat.messages_field(cfg, ds.column_names)
        return
    if cfg.shape == "text":
        if cfg.text_field not in ds.column_names:
            raise ConfigError(
                f"data.text_field {cfg.text_field!r} is not a column "
                f"(columns: {', '.join(ds.column_names)})",
                "set data.text_field to the column that holds the text",
            )
        return
    assert cfg.prompt_template is not None and cfg.response_template is not None
    for key, template in (
        ("data.prompt_template", cfg.prompt_template),
        ("data.response_template", cfg.response_template),
    ):
        try:
            missing = [f for f in fields(template) if f not in ds.column_names]
        except TemplateError as exc:
            raise ConfigError(f"{key}: {exc}", "use {field} or {field[key]} placeholders") from None
        if missing:
            raise ConfigError(
                f"{key} uses {', '.join('{' + m + '}' for m in missing)}, which the data lacks "
                f"(columns: {', '.join(ds.column_names)})",
                f"change {key} to use those columns",
            )
        for i in range(min(3, len(ds))):
            try:
                render(template, ds[i])
            except TemplateError as exc:
                raise DataError(
                    f"{row_location(cfg, ds[i], i)}: {key}: {exc}", f"fix {key} or the data"
                ) from None


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


def _count_blank(template: str, batch: list[dict[str, Any]], stats: TokenizeStats) -> None:
    for row in batch:
        for name in blank_fields(template, row):
            stats.empty_fields[name] = stats.empty_fields.get(name, 0) + 1


def _instruction_batch(
    batch: list[dict[str, Any]], first_row: int, cfg: DataSection
) -> list[tuple[str, int] | None]:
    """(full text, where the response starts) per row; None for a row without a response."""
    assert cfg.prompt_template is not None and cfg.response_template is not None
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
        # " {answer}" with a null answer renders as " ": empty all the same.
        used = placeholders(cfg.response_template)
        blank = blank_fields(cfg.response_template, row)
        empty = not response.strip() or (bool(used) and len(blank) == len(used))
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
    """The conversation cut after its last assistant turn that still fits data.max_length."""
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
            _count_blank(cfg.prompt_template + cfg.response_template, batch, stats)
            rendered = _instruction_batch(batch, start, cfg)
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
