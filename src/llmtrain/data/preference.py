"""Preference pairs (method dpo, orpo): rows -> a chosen and a rejected sample per row.

Two row forms, rendered exactly as SFT renders its data (templates.py, chat.py, encode.py):

- instruction (`data.shape: instruction`): `{"prompt", "chosen", "rejected"}`. The prompt goes
  through `data.prompt_template`; the answers through `data.response_template`, which names
  the chosen field (e.g. `{chosen}`): the rejected answer is the same template with the row's
  rejected text in the chosen field's place. Each sample ends with EOS, as SFT samples do.
- conversation (`data.shape: chat`): a shared conversation in `data.messages_field` (default:
  the first of `prompt`, `messages`, `conversations` the data has; a string is one user turn)
  and the final assistant message of each side in `chosen` and `rejected` (text, a turn, or a
  list of turns). Without a shared column, `chosen` and `rejected` are whole conversations
  that must agree on every turn but the last (the UltraFeedback layout).

Labels follow SFT's boundary rule: the whole text is tokenized at once and only the tokens of
the final answer (and its EOS or end-of-turn token) carry labels, with one BOS/EOS policy
(vocab/special_tokens.py). A row that cannot form a pair is bad data (exit 65, file and line).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import datasets

from llmtrain.config import DataSection
from llmtrain.data import chat
from llmtrain.data.encode import Encoded, encode
from llmtrain.data.rows import row_location
from llmtrain.data.special_text import SpecialText
from llmtrain.data.templates import TemplateError, field_values, fields, is_missing, render
from llmtrain.data.tokenize import TokenizeStats, rendered
from llmtrain.errors import ConfigError, DataError
from llmtrain.labels import IGNORE_INDEX
from llmtrain.vocab import special_tokens

SIDES = ("chosen", "rejected")
COLUMNS = tuple(f"{side}_{part}" for side in SIDES for part in ("input_ids", "labels"))
SHARED_COLUMNS = ("prompt", "messages", "conversations")
ROW_FIX = (
    'each row needs {"prompt": ..., "chosen": "...", "rejected": "..."} with two different, '
    "non-empty answers (or, for data.shape=chat, a shared conversation and the chosen and "
    "rejected final assistant messages)"
)


def shared_field(cfg: DataSection, columns: list[str]) -> str | None:
    """The column of the shared conversation (chat), or None when chosen and rejected hold
    whole conversations."""
    if cfg.messages_field is not None:
        return chat.messages_field(cfg, columns)
    return next((c for c in SHARED_COLUMNS if c in columns), None)


def check_columns(cfg: DataSection, columns: list[str]) -> None:
    """The data has what pairs are made of (rows.check_templates checks the templates' fields).

    Raises:
        ConfigError: data.shape=text, no chosen or rejected column, a response template that
            does not name the chosen field (exit 64).
    """
    if cfg.shape == "text":
        raise ConfigError(
            "method dpo/orpo trains on pairs of answers, and data.shape=text has none",
            "use data.shape=instruction ({prompt, chosen, rejected} rows) or data.shape=chat",
        )
    missing = [s for s in SIDES if s not in columns]
    if missing:
        raise ConfigError(
            f"preference data needs the columns chosen and rejected; it lacks "
            f"{', '.join(missing)} (columns: {', '.join(columns)})",
            "give each row a chosen and a rejected answer",
        )
    if cfg.shape == "instruction":
        assert cfg.response_template is not None
        if "chosen" not in fields(cfg.response_template):
            raise ConfigError(
                f"data.response_template {cfg.response_template!r} does not use {{chosen}}: "
                "for preference data it renders the chosen answer, and the rejected answer "
                "with the rejected text in its place",
                "set data.response_template to '{chosen}' (or text around it)",
            )


def _answer_text(row: dict[str, Any], side: str, where: Callable[[], str]) -> str:
    value = row.get(side)
    if is_missing(value) or not isinstance(value, str) or not value.strip():
        what = "missing" if is_missing(value) else (
            "empty" if isinstance(value, str) else f"a {type(value).__name__}, not text"
        )
        raise DataError(f"{where()}: {side} is {what}", ROW_FIX)
    return value


def _instruction_pair(
    row: dict[str, Any], cfg: DataSection, where: Callable[[], str]
) -> list[tuple[str, int]]:
    """[(text, where the answer starts)] for chosen and rejected."""
    assert cfg.prompt_template is not None and cfg.response_template is not None
    chosen, rejected = (_answer_text(row, side, where) for side in SIDES)
    if chosen == rejected:
        raise DataError(f"{where()}: chosen and rejected are the same text", ROW_FIX)
    try:
        prompt = render(cfg.prompt_template, row)
        answers = [render(cfg.response_template, {**row, "chosen": a}) for a in (chosen, rejected)]
    except TemplateError as exc:
        raise DataError(
            f"{where()}: {exc}", "fix the data, or data.prompt_template / data.response_template"
        ) from None
    return [(prompt + answer, len(prompt)) for answer in answers]


def _turns(value: Any, name: str, where: Callable[[], str]) -> list[Any]:
    """A column's raw turns: text is one turn of `role`, a dict one turn, a list is kept."""
    if isinstance(value, str):
        role = "user" if name not in SIDES else "assistant"
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    what = "missing" if is_missing(value) else f"a {type(value).__name__}"
    raise DataError(f"{where()}: {name} is {what}, not text, a turn or a list of turns", ROW_FIX)


def _chat_pair(
    row: dict[str, Any],
    shared: str | None,
    cfg: DataSection,
    where: Callable[[], str],
) -> list[list[chat.Message]]:
    """The chosen and the rejected conversation; they differ only in the last turn, which is
    the assistant's."""
    head = _turns(row[shared], shared, where) if shared is not None else []
    convs = [chat.conversation(head + _turns(row.get(s), s, where), cfg, where) for s in SIDES]
    chosen, rejected = convs
    for side, conv in zip(SIDES, convs, strict=True):
        if conv[-1]["role"] != "assistant" or not conv[-1]["content"].strip():
            raise DataError(f"{where()}: the {side} conversation does not end with a non-empty "
                            "assistant message", ROW_FIX)
    if chosen[:-1] != rejected[:-1]:
        raise DataError(
            f"{where()}: chosen and rejected differ before their last turn", ROW_FIX
        )
    if chosen[-1] == rejected[-1]:
        raise DataError(f"{where()}: chosen and rejected are the same answer", ROW_FIX)
    return convs


def chat_prompts(
    rows: datasets.Dataset, cfg: DataSection
) -> list[tuple[list[chat.Message], str]]:
    """Conversation pairs as generation prompts: (the shared turns, the chosen answer) per row.

    Raises:
        DataError: as tokenize_pairs, for a row that is no pair (exit 65).
    """
    shared = shared_field(cfg, rows.column_names)
    out = []
    for i, row in enumerate(rows):
        chosen, _ = _chat_pair(row, shared, cfg, functools.partial(row_location, cfg, row, i))
        out.append((chosen[:-1], chosen[-1]["content"]))
    return out


def _fit(ex: Encoded, cfg: DataSection) -> Encoded | str:
    """data.max_length and data.overflow on one side; a string says why it is dropped."""
    if ex.first_trained >= min(len(ex.input_ids), cfg.max_length):
        return "prompt"
    if len(ex.input_ids) <= cfg.max_length:
        return ex
    if cfg.overflow == "drop":
        return "long"
    n = cfg.max_length
    return Encoded(ex.input_ids[:n], ex.labels[:n], ex.first_trained)


def _data_text(
    row: dict[str, Any],
    convs: list[list[chat.Message]] | None,
    cfg: DataSection,
    where: Callable[[], str],
) -> list[tuple[str, str]]:
    """The row's own text, for data.special_tokens_in_text: the chosen conversation's turns
    and the rejected answer (`convs`, from _chat_pair), or the fields the templates fill and
    both answers.

    Raises:
        DataError: the row is no pair (exit 65), as tokenize_pairs.
    """
    if convs is not None:
        chosen, rejected = convs
        return [*chat.contents(chosen), ("the rejected answer", rejected[-1]["content"])]
    assert cfg.prompt_template is not None and cfg.response_template is not None
    answers = [(side, _answer_text(row, side, where)) for side in SIDES]
    filled = field_values(cfg.prompt_template + cfg.response_template, row)
    return [v for v in filled if v[0] != "{chosen}"] + answers


def check_pair_rows(
    ds: datasets.Dataset, tokenizer: Any, cfg: DataSection
) -> tuple[list[int], int]:
    """What tokenize_pairs checks of each row, without tokenizing (validate runs it on every
    row and tokenizes a sample; prepare keeps for `generate` only the held-out rows it keeps).

    Returns:
        the indices of the rows kept, and how many data.special_tokens_in_text=drop left out.

    Raises:
        DataError, ConfigError: as tokenize_pairs, for the first such row.
    """
    check_columns(cfg, ds.column_names)
    template = chat.resolve_template(tokenizer, cfg) if cfg.shape == "chat" else ""
    shared = shared_field(cfg, ds.column_names) if cfg.shape == "chat" else None
    special_text = SpecialText(tokenizer, cfg.special_tokens_in_text)
    kept: list[int] = []
    for i, row in enumerate(ds):
        where = functools.partial(row_location, cfg, row, i)
        convs = _chat_pair(row, shared, cfg, where) if cfg.shape == "chat" else None
        if not special_text.keeps(_data_text(row, convs, cfg, where), where):
            continue
        if convs is None:
            _instruction_pair(row, cfg, where)
        else:
            for conv in convs:
                rendered(tokenizer, template, conv, "last_assistant", where)
        kept.append(i)
    special_text.check()
    return kept, len(ds) - len(kept)


def tokenize_pairs(
    ds: datasets.Dataset, tokenizer: Any, cfg: DataSection
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Rows -> {chosen,rejected}_{input_ids,labels} (int lists), labels -100 except on the
    final answer's tokens. A pair whose prompt fills data.max_length, or (overflow=drop) one
    side of which is too long, is dropped and counted; `truncated` counts pairs.

    Raises:
        DataError: a row without two different non-empty answers, a conversation the chat
            template refuses, text holding a special token's text under
            data.special_tokens_in_text=refuse, or no pair left (exit 65).
        ConfigError: see check_columns (exit 64).
    """
    check_columns(cfg, ds.column_names)
    special = special_tokens.decide(tokenizer)
    stats = TokenizeStats(rows=len(ds))
    out: dict[str, list[list[int]]] = {c: [] for c in COLUMNS}
    template = chat.resolve_template(tokenizer, cfg) if cfg.shape == "chat" else ""
    shared = shared_field(cfg, ds.column_names) if cfg.shape == "chat" else None
    special_text = SpecialText(tokenizer, cfg.special_tokens_in_text)
    for i, row in enumerate(ds):
        where = functools.partial(row_location, cfg, row, i)
        convs = _chat_pair(row, shared, cfg, where) if cfg.shape == "chat" else None
        if not special_text.keeps(_data_text(row, convs, cfg, where), where):
            stats.dropped_special += 1
            continue
        if convs is not None:
            encoded = []
            for conv in convs:
                one = rendered(tokenizer, template, conv, "last_assistant", where)
                encoded += encode([one.text], [one.spans], tokenizer, special, add_eos=False)
        else:
            texts = _instruction_pair(row, cfg, where)
            spans = [[(cut, len(text))] for text, cut in texts]
            encoded = encode([t for t, _ in texts], spans, tokenizer, special)
        fitted = [_fit(ex, cfg) for ex in encoded]
        if "prompt" in fitted:
            stats.dropped_prompt_too_long += 1
            continue
        if "long" in fitted:
            stats.dropped_too_long += 1
            continue
        pair = [ex for ex in fitted if isinstance(ex, Encoded)]
        stats.truncated += any(len(a.input_ids) < len(b.input_ids) for a, b in zip(
            pair, encoded, strict=True
        ))
        for side, ex in zip(SIDES, pair, strict=True):
            out[f"{side}_input_ids"].append(ex.input_ids)
            out[f"{side}_labels"].append(ex.labels)
    special_text.check()
    stats.kept = len(out["chosen_input_ids"])
    stats.tokens = sum(len(x) for s in SIDES for x in out[f"{s}_input_ids"])
    stats.loss_tokens = sum(
        sum(1 for t in x if t != IGNORE_INDEX) for s in SIDES for x in out[f"{s}_labels"]
    )
    if stats.kept == 0:
        raise DataError(
            f"no usable preference pairs: {stats.summary()}",
            "raise data.max_length above the prompt length, or check the data",
        )
    return datasets.Dataset.from_dict(out), stats
