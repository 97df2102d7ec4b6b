"""Prompts for generation from dataset rows, rendered as training rendered them.

Instruction rows go through data.prompt_template; conversations through the chat template up
to their last assistant turn, ending with the assistant's cue. The reference is the response
template's text or the last assistant turn. By default the rows are the held-out ones
(data.eval_fraction), so answers are never read back from training rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import datasets

from llmtrain.config import DataSection, RunConfig
from llmtrain.data import chat, preference, prepared
from llmtrain.data.rows import load_rows, row_location
from llmtrain.data.templates import TemplateError, render
from llmtrain.errors import DataError


@dataclass
class Prompts:
    prompts: list[str]  # rendered text, special tokens as text
    references: list[str] | None
    # chat rows: the turns before the answer (None for rows of other shapes)
    conversations: list[list[chat.Message] | None] | None


Sources = list[tuple[DataSection, datasets.Dataset]]


def held_out(cfg: RunConfig) -> Sources | None:
    """[(source section, its prepared held-out rows)], or None when any source has none (the
    run at output.dir kept none, or output.dir is not a run's directory). Reads no data."""
    sections = cfg.data.for_sources()
    kept = [prepared.held_out_rows(cfg.prepared_dir(), k) for k in range(len(sections))]
    if any(rows is None for rows in kept):
        return None
    return [(s, r) for s, r in zip(sections, kept, strict=True) if r is not None]


def all_rows(cfg: RunConfig) -> Sources:
    """[(source section, all its rows)], training rows included."""
    return [(s, load_rows(s)) for s in cfg.data.for_sources()]


def held_out_rows(cfg: RunConfig) -> tuple[Sources, bool]:
    """(held_out(cfg), True) when the run has held-out rows, else (all_rows(cfg), False)."""
    kept = held_out(cfg)
    return (kept, True) if kept is not None else (all_rows(cfg), False)


def from_rows(rows: datasets.Dataset, data: DataSection, tokenizer: Any) -> Prompts:
    """Raises: DataError (a row does not render), ConfigError (no usable chat template)."""
    if data.shape == "chat" and set(preference.SIDES) <= set(rows.column_names):
        # Preference pairs (dpo, orpo): the shared turns, answered; the chosen answer.
        template = tokenizer.chat_template or chat.resolve_template(tokenizer, data)
        pairs = preference.chat_prompts(rows, data)
        return Prompts(
            [chat.render(tokenizer, template, turns, generation_prompt=True) for turns, _ in pairs],
            [answer for _, answer in pairs],
            [turns for turns, _ in pairs],
        )
    if data.shape == "chat":
        template = tokenizer.chat_template or chat.resolve_template(tokenizer, data)
        field = chat.messages_field(data, rows.column_names)
        prompts: list[str] = []
        refs: list[str] = []
        convs: list[list[chat.Message] | None] = []
        for i, row in enumerate(rows):
            where = functools.partial(row_location, data, row, i)
            messages = chat.conversation(row[field], data, where)
            last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
            prompts.append(chat.generation_prompt(tokenizer, template, messages))
            refs.append(messages[last]["content"])
            convs.append(messages[:last])
        return Prompts(prompts, refs, convs)
    if data.prompt_template is None:
        raise DataError(
            "generation from dataset rows needs data.prompt_template (or data.shape=chat)",
            "set data.prompt_template, or pass --prompts FILE",
        )
    try:
        texts = [render(data.prompt_template, r) for r in rows]
        answers = None
        if data.response_template:
            answers = [render(data.response_template, r) for r in rows]
    except TemplateError as exc:
        raise DataError(str(exc), "fix data.prompt_template or the data") from None
    return Prompts(texts, answers, None)


def from_sources(
    sources: list[tuple[DataSection, datasets.Dataset]], tokenizer: Any, limit: int | None
) -> Prompts:
    """Prompts of every text-generating source in order, at most `limit` in all."""
    out = Prompts([], [], [])
    for section, rows in sources:
        if section.shape == "text":
            continue
        left = None if limit is None else limit - len(out.prompts)
        if left is not None and left <= 0:
            break
        part = from_rows(rows.select(range(min(left or len(rows), len(rows)))), section, tokenizer)
        out.prompts += part.prompts
        out.references = (out.references or []) + (part.references or [""] * len(part.prompts))
        out.conversations = (out.conversations or []) + (
            part.conversations or [None] * len(part.prompts)
        )
    if not any(out.conversations or []):
        out.conversations = None
    return out


def from_texts(texts: list[str], cfg: RunConfig, tokenizer: Any) -> Prompts:
    """User prompts as given; for chat runs each becomes a user turn (after
    data.system_prompt) in the chat template, as the model was trained to see it."""
    if cfg.data.shape != "chat":
        return Prompts(texts, None, None)
    template = tokenizer.chat_template or chat.resolve_template(tokenizer, cfg.data)
    convs: list[list[chat.Message] | None] = []
    for text in texts:
        turns = [{"role": "user", "content": text}]
        if cfg.data.system_prompt is not None:
            turns.insert(0, {"role": "system", "content": cfg.data.system_prompt})
        convs.append(turns)
    prompts = [chat.render(tokenizer, template, c, generation_prompt=True) for c in convs if c]
    return Prompts(prompts, None, convs)
