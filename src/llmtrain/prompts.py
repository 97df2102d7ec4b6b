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

from llmtrain import chat
from llmtrain.config import RunConfig
from llmtrain.data import load_rows, row_location
from llmtrain.errors import DataError
from llmtrain.templates import TemplateError, render


@dataclass
class Prompts:
    prompts: list[str]  # rendered text, special tokens as text
    references: list[str] | None
    conversations: list[list[chat.Message]] | None  # chat: the turns before the answer


def held_out_rows(cfg: RunConfig) -> tuple[datasets.Dataset, bool]:
    """(rows, held_out): the prepared held-out rows when there are some, else all rows."""
    rows_dir = cfg.prepared_dir() / "eval_rows"
    if rows_dir.is_dir():
        return datasets.load_from_disk(str(rows_dir)), True
    return load_rows(cfg.data), False


def from_rows(rows: datasets.Dataset, cfg: RunConfig, tokenizer: Any) -> Prompts:
    """Raises: DataError (a row does not render), ConfigError (no usable chat template)."""
    data = cfg.data
    if data.shape == "chat":
        template = tokenizer.chat_template or chat.resolve_template(tokenizer, data)
        field = chat.messages_field(data, rows.column_names)
        prompts: list[str] = []
        refs: list[str] = []
        convs: list[list[chat.Message]] = []
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


def from_texts(texts: list[str], cfg: RunConfig, tokenizer: Any) -> Prompts:
    """User prompts as given; for chat runs each becomes a user turn (after
    data.system_prompt) in the chat template, as the model was trained to see it."""
    if cfg.data.shape != "chat":
        return Prompts(texts, None, None)
    template = tokenizer.chat_template or chat.resolve_template(tokenizer, cfg.data)
    convs: list[list[chat.Message]] = []
    for text in texts:
        turns = [{"role": "user", "content": text}]
        if cfg.data.system_prompt is not None:
            turns.insert(0, {"role": "system", "content": cfg.data.system_prompt})
        convs.append(turns)
    prompts = [chat.render(tokenizer, template, c, generation_prompt=True) for c in convs]
    return Prompts(prompts, None, convs)
