"""Special-token text inside the data (data.special_tokens_in_text).

A tokenizer reads the text of each of its special tokens (`</s>`, `<|im_end|>`, `<s>`) as that
one control token wherever it appears, in the data's own characters too. A response that quotes
`</s>` (HTML strikethrough `<s>...</s>`, a text about tokenizers) is then trained to end in the
middle, and a user turn holding `<|im_start|>assistant` reads as a turn of its own. The
templates' markers are meant; the data's are checked here, on the values the data gives (the
fields a prompt or response template fills, each turn's content, the text field), never on the
templates' own text:

- `refuse` (the default): exit 65 naming the row, the field and the token;
- `drop`: the row is left out and counted (TokenizeStats.dropped_special);
- `keep`: read as control tokens, for text meant to hold them (chat already rendered to text).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

from llmtrain.errors import DataError

Policy = Literal["refuse", "drop", "keep"]
FIX = (
    "remove or escape it in the data; data.special_tokens_in_text: drop leaves such rows out "
    "(counted), keep reads them as control tokens (text meant to hold them, such as chat "
    "already rendered with its template)"
)


def special_strings(tokenizer: Any) -> list[str]:
    """The texts the tokenizer reads as one special token: its named special tokens (BOS, EOS,
    UNK, pad, additional) and every added token marked special (`<|im_start|>`), longest first."""
    strings = set(getattr(tokenizer, "all_special_tokens", []))
    added = getattr(tokenizer, "added_tokens_decoder", {})
    strings |= {t.content for t in added.values() if getattr(t, "special", False)}
    return sorted((s for s in strings if s), key=lambda s: (-len(s), s))


class SpecialText:
    """The check of one dataset: its tokenizer's special-token texts under one policy.

    Args:
        tokenizer: a transformers tokenizer (slow or fast).
        policy: data.special_tokens_in_text.
    """

    def __init__(self, tokenizer: Any, policy: Policy) -> None:
        self.policy = policy
        strings = special_strings(tokenizer) if policy != "keep" else []
        self._pattern = re.compile("|".join(map(re.escape, strings))) if strings else None

    def keeps(self, values: Iterable[tuple[str, str]], where: Callable[[], str]) -> bool:
        """Whether a row whose data gives `values` ((what, text) pairs, e.g. ("{answer}",
        "...")) is kept: True unless one holds a special token's text under `drop`.

        Raises:
            DataError: one does, under `refuse` (exit 65).
        """
        if self._pattern is None:
            return True
        for what, text in values:
            found = self._pattern.search(text)
            if found is None:
                continue
            if self.policy == "drop":
                return False
            token = found.group()
            raise DataError(
                f"{where()}: {what} holds {token!r}, the text of one of the tokenizer's special "
                f"tokens: it would be read and trained as that control token, not as the "
                f"characters {token!r}",
                FIX,
            )
        return True
