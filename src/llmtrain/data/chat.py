"""Conversations: rows of turns rendered with a chat template, the loss on assistant turns.

Rows hold a list of turns, OpenAI style (`{"role": "user", "content": ...}`) or ShareGPT style
(`{"from": "human", "value": ...}`, roles mapped). The chat template is the tokenizer's own
(`data.chat_template: auto`), a built-in for base models, or a Jinja string.

Which characters an assistant turn owns is found by rendering prefixes of the conversation:
turn k starts where `messages[:k]` rendered with the generation prompt ends, and ends where
`messages[:k+1]` ends, less trailing white space. That span holds the content and the
template's end-of-turn token, so the model learns to stop. The whole conversation is
tokenized at once (encode.py), so no spurious pieces appear at turn edges.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmtrain.config import DataSection
from llmtrain.data.encode import Span
from llmtrain.errors import ConfigError, DataError

ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
}

# Built-ins for base models without a template of their own. ChatML as Qwen and SmolLM use it;
# Llama-2 and Mistral as their tokenizers shipped them (a leading system message folded into
# the first user turn for Mistral, which has no system role); Alpaca's instruction format.
# `bos`: the tokenizer's BOS, or nothing for tokenizers without one (GPT-2, Qwen).
_BOS = (
    "{% if bos_token is defined %}{% set bos = bos_token %}{% else %}{% set bos = '' %}"
    "{% endif %}"
)
TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama-2": (
        _BOS
        + "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}"
        "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + "
        "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos + '[INST] ' + content.strip() + "
        "' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + "
        "' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "mistral": (
        _BOS
        + "{{ bos }}"
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\\n\\n' %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
        "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + "
        "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}"
        "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + "
        "'\\n\\n' }}{% endif %}{% endfor %}"
    ),
}

Message = dict[str, str]
# OpenAI's fine-tuning format: `"weight": 0` on an assistant message leaves it untrained. Kept
# on the message as "0" (never handed to a template) so render_with_spans can mask the turn.
WEIGHT = "weight"


def messages_field(cfg: DataSection, columns: Sequence[str]) -> str:
    """The column holding the turns.

    Raises:
        ConfigError: data.messages_field is not a column, or neither default is (exit 64).
    """
    if cfg.messages_field is not None:
        if cfg.messages_field not in columns:
            raise ConfigError(
                f"data.messages_field {cfg.messages_field!r} is not a column "
                f"(columns: {', '.join(columns)})",
                "set data.messages_field to the column that holds the list of turns",
            )
        return cfg.messages_field
    for name in ("messages", "conversations"):
        if name in columns:
            return name
    raise ConfigError(
        f"data.shape=chat needs a column of turns: 'messages' (OpenAI) or 'conversations' "
        f"(ShareGPT); the data has {', '.join(columns)}",
        "set data.messages_field to the column that holds the list of turns",
    )


def conversation(turns: Any, cfg: DataSection, where: Callable[[], str]) -> list[Message]:
    """One row's turns as [{"role", "content"}], roles mapped, data.system_prompt added;
    `where()` names the row in errors (data.row_location; called only on an error).

    Raises:
        DataError: not a list of turns, a turn without role or content, an unknown role,
            content that is not text, a weight other than 0 or 1 or on a turn that is not the
            assistant's, no turns, or no assistant turn (exit 65).
    """

    def bad(problem: str) -> DataError:
        return DataError(
            f"{where()}: {problem}",
            'each row needs a list of turns like {"role": "user", "content": "..."} '
            '(or ShareGPT {"from": "human", "value": "..."}) with at least one assistant turn',
        )

    if not isinstance(turns, list):
        raise bad(f"the turns are a {type(turns).__name__}, not a list")
    if not turns:
        raise bad("the conversation is empty")
    out: list[Message] = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise bad(f"turn {k + 1} is a {type(turn).__name__}, not an object")
        role = turn.get("role") if turn.get("role") is not None else turn.get("from")
        content = turn.get("content") if turn.get("content") is not None else turn.get("value")
        if role is None:
            raise bad(f"turn {k + 1} has no role (no 'role' or 'from' key)")
        if role not in ROLES:
            raise bad(f"turn {k + 1} has the unknown role {role!r} (known: {', '.join(ROLES)})")
        if content is None:
            raise bad(f"turn {k + 1} ({role}) has no content (no 'content' or 'value' key)")
        if not isinstance(content, str):
            raise bad(f"turn {k + 1} ({role}) content is a {type(content).__name__}, not text")
        message = {"role": ROLES[role], "content": content}
        weight = turn.get(WEIGHT)
        if weight is not None:
            if isinstance(weight, bool) or weight not in (0, 1):
                raise bad(f"turn {k + 1} ({role}) has weight {weight!r}: OpenAI's weight is 0 "
                          "(not trained) or 1")
            if ROLES[role] != "assistant":
                raise bad(f"turn {k + 1} ({role}) has a weight: only assistant turns take one")
            if weight == 0:
                message[WEIGHT] = "0"
        out.append(message)
    if not any(m["role"] == "assistant" for m in out):
        raise bad("no assistant turn: nothing to train on")
    if cfg.system_prompt is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": cfg.system_prompt})
    return out


def resolve_template(tokenizer: Any, cfg: DataSection) -> str:
    """The Jinja chat template data.chat_template names.

    Raises:
        ConfigError: `auto` and the tokenizer has no chat template (exit 64).
    """
    choice = cfg.chat_template
    if choice == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise ConfigError(
                "data.chat_template=auto, but the tokenizer has no chat template of its own",
                f"set data.chat_template to one of {', '.join(TEMPLATES)}, or to a Jinja "
                "template string",
            )
        return str(own)
    if choice in TEMPLATES:
        return TEMPLATES[choice]
    if "{{" not in choice and "{%" not in choice:
        raise ConfigError(
            f"data.chat_template {choice!r} is neither a built-in nor a Jinja template",
            f"use auto, one of {', '.join(TEMPLATES)}, or a Jinja template string",
        )
    import jinja2

    try:
        jinja2.Environment().parse(choice)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(
            f"data.chat_template is not a valid Jinja template: {exc.message} (line {exc.lineno})",
            "fix the template, or use one of " + ", ".join(TEMPLATES),
        ) from None
    return choice


def contents(messages: list[Message]) -> list[tuple[str, str]]:
    """("turn N (role)", its content) for each message: the data's own text of a conversation
    (data.special_tokens_in_text checks these)."""
    return [(f"turn {k + 1} ({m['role']})", m["content"]) for k, m in enumerate(messages)]


class TemplateRefused(ValueError):
    """The chat template raised on a conversation (e.g. roles that do not alternate)."""


def render(
    tokenizer: Any, template: str, messages: list[Message], *, generation_prompt: bool = False
) -> str:
    """The conversation as text, with the template's special tokens as text.

    Raises:
        TemplateRefused: the template raised an error for these messages.
        ConfigError: the chat template uses a name the tokenizer does not define (exit 64).
    """
    import jinja2

    shown = [{k: v for k, v in m.items() if k != WEIGHT} for m in messages]
    try:
        return str(
            tokenizer.apply_chat_template(
                shown,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        )
    except jinja2.UndefinedError as exc:
        raise ConfigError(
            f"the chat template uses a name the tokenizer does not define: {exc}",
            "use a template written for this tokenizer, or one of " + ", ".join(TEMPLATES),
        ) from None
    except jinja2.TemplateError as exc:
        raise TemplateRefused(str(exc)) from None


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[Span]  # characters that carry the loss
    turn_ends: list[int]  # where each assistant turn's span ends, for truncation at a turn


def render_with_spans(
    tokenizer: Any, template: str, messages: list[Message], train_on: str
) -> Rendered:
    """The rendered conversation and the character spans of its trained turns.

    Raises:
        ConfigError: the template renders a prefix of the conversation differently from the
            start of the whole (assistant turns cannot be located), exit 64.
        TemplateRefused: the template raised, or left a system or user turn out of the text.
    """
    text = render(tokenizer, template, messages)
    for k, m in enumerate(messages):
        shown = m["content"].strip()
        if m["role"] != "assistant" and shown and shown not in text:
            # llama-2, mistral and alpaca render a system message only as the first turn
            raise TemplateRefused(
                f"the chat template leaves turn {k + 1} ({m['role']}) out of the text, so the "
                "model would never read it; a system message after the first turn is dropped "
                "by llama-2, mistral and alpaca: move it first, or use chatml"
            )
    spans: list[Span] = []
    weighted: list[bool] = []  # per assistant turn: trained (text, and no `"weight": 0`)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(tokenizer, template, messages[:k], generation_prompt=True) if k else ""
        upto = render(tokenizer, template, messages[: k + 1])
        if not (text.startswith(upto) and upto.startswith(head)):
            raise ConfigError(
                "the chat template renders the start of a conversation differently from the "
                "whole, so assistant turns cannot be located in the text",
                "use a template whose output grows turn by turn (data.chat_template: chatml, "
                "llama-2, mistral, alpaca), or data.train_on=all",
            )
        end = len(upto.rstrip())
        spans.append((len(head), max(end, len(head))))
        # An empty reply teaches nothing but to end the turn at once: untrained, as an
        # instruction row's empty response is dropped.
        weighted.append(m.get(WEIGHT) != "0" and bool(m["content"].strip()))
    ends = [b for _, b in spans]
    if train_on == "all":
        spans = [(0, len(text))]
    elif train_on == "last_assistant":
        spans = [span for span, on in zip(spans[-1:], weighted[-1:], strict=True) if on]
    else:
        spans = [span for span, on in zip(spans, weighted, strict=True) if on]
    return Rendered(text, spans, ends)


def generation_prompt(tokenizer: Any, template: str, messages: list[Message]) -> str:
    """The conversation up to its last assistant turn, ending with the assistant's cue."""
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    return render(tokenizer, template, messages[:last], generation_prompt=True)


def end_of_turn_id(tokenizer: Any, template: str) -> int | None:
    """The token that ends an assistant turn in this template, when it is a single special
    token (`<|im_end|>`, `</s>`, `<|eot_id|>`); None when the template ends turns in text."""
    probe = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    rendered = render_with_spans(tokenizer, template, probe, "assistant")
    a, b = rendered.spans[0]
    ids = tokenizer(rendered.text[a:b], add_special_tokens=False).input_ids
    specials = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return int(ids[-1]) if ids and ids[-1] in specials else None


def stop_ids(tokenizer: Any) -> list[int]:
    """Extra ids that end generation for a chat-trained model: the template's end-of-turn
    token where it is not the tokenizer's EOS."""
    template = getattr(tokenizer, "chat_template", None)
    eot = end_of_turn_id(tokenizer, template) if template else None
    return [eot] if eot is not None and eot != tokenizer.eos_token_id else []
