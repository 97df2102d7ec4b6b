"""Special-token text inside the data (data.special_tokens_in_text).

A tokenizer reads the text of each of its special tokens (`</s>`, `<|im_end|>`, `<s>`) as that
one control token wherever it appears, in the data's own characters too. A response that quotes
`</s>` (HTML strikethrough `<s>...</s>`, a text about tokenizers) is then trained to end in the
middle, and a user turn holding `<|im_start|>assistant` reads as a turn of its own. The
templates' markers are meant; the data's are checked here, on the values the data gives (the
fields a prompt or response template fills, each turn's content, the text field), never on the
templates' own text:

- `refuse` (the default): exit 65 naming how many rows do, and the first ones with their
  field and token;
- `drop`: the rows are left out and counted (TokenizeStats.dropped_special);
- `keep`: read as control tokens, for text meant to hold them (chat already rendered to text).

No setting trains such characters as plain text: the pinned tokenizers library cannot switch
special-token matching off for part of a text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

from llmtrain.errors import DataError

Policy = Literal["refuse", "drop", "keep"]
FIX = (
    "remove the token's text from those rows, or set data.special_tokens_in_text: drop (leave "
    "them out, counted) or keep (read it as the control token: text meant to hold it, such as "
    "chat already rendered with its template)"
)
SHOWN = 3  # rows named in the refusal


def special_strings(tokenizer: Any) -> list[str]:
    """The texts the tokenizer reads as one special token, longest first: every added token
    marked special (`<|im_start|>`) and its named special tokens (BOS, EOS, UNK, pad,
    additional) that are added tokens. A named one that is a piece of the vocabulary (a
    model.pad_token or model.eos_token such as `m` or `.`) is read as its characters, not
    split out of the text, so data holding it is no problem. A tokenizer with no added tokens
    (a custom one that splits out its specials itself) has all its named ones checked."""
    named = set(getattr(tokenizer, "all_special_tokens", []))
    added = list(getattr(tokenizer, "added_tokens_decoder", {}).values())
    if added:
        strings = {t.content for t in added if getattr(t, "special", False) or t.content in named}
    else:
        strings = named
    return sorted((s for s in strings if s), key=lambda s: (-len(s), s))


class SpecialText:
    """The check of one dataset: its tokenizer's special-token texts under one policy. Under
    `refuse`, `keeps` records each row and `check` raises once all rows were seen, so the error
    counts them all.

    Args:
        tokenizer: a transformers tokenizer (slow or fast).
        policy: data.special_tokens_in_text.
    """

    def __init__(self, tokenizer: Any, policy: Policy) -> None:
        self.policy = policy
        strings = special_strings(tokenizer) if policy != "keep" else []
        self._pattern = re.compile("|".join(map(re.escape, strings))) if strings else None
        self.refused = 0
        self._shown: list[str] = []

    def keeps(self, values: Iterable[tuple[str, str]], where: Callable[[], str]) -> bool:
        """Whether a row whose data gives `values` ((what, text) pairs, e.g. ("{answer}",
        "...")) is trained: False when one holds a special token's text (under `refuse` the
        row is also recorded for `check`)."""
        if self._pattern is None:
            return True
        for what, text in values:
            found = self._pattern.search(text)
            if found is None:
                continue
            if self.policy == "refuse":
                self.refused += 1
                if len(self._shown) < SHOWN:
                    self._shown.append(f"{where()}: {what} holds {found.group()!r}")
            return False
        return True

    def check(self) -> None:
        """Raises:
        DataError: rows were refused (exit 65), naming the first ones."""
        if not self.refused:
            return
        rows = "a row of the data holds" if self.refused == 1 else f"{self.refused} rows hold"
        more = f" (and {self.refused - SHOWN} more)" if self.refused > SHOWN else ""
        raise DataError(
            f"{rows} the text of one of the tokenizer's special tokens, which "
            "would be read and trained as that control token, not as those characters: "
            + "; ".join(self._shown)
            + more,
            FIX,
        )
