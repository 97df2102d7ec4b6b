"""Text plus the character spans to train on -> `input_ids` and `labels`.

The whole text is tokenized at once, so `input_ids` are exactly the tokenization of what the
model will read. Tokenizing prompt and response apart, as many scripts do, adds a spurious
piece at the boundary with SentencePiece (every response starts with an extra `▁`) and splits
merges that span it with byte-level BPE. Labels are -100 except on the tokens whose characters
lie in a trained span; a token that straddles a span's edge is trained (it carries trained
characters). Fast tokenizers give each token's character offsets; for slow ones the edges are
found by tokenizing each prefix of the text up to an edge and comparing ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmtrain.labels import IGNORE_INDEX
from llmtrain.vocab.special_tokens import SpecialTokens

Span = tuple[int, int]  # [start, end) in characters


@dataclass(frozen=True)
class Encoded:
    """One sample: ids and labels (equal length, ints); `first_trained` is the index of the
    first label that is not -100, or len(ids) when none is."""

    input_ids: list[int]
    labels: list[int]
    first_trained: int


def trained_by_offsets(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[bool]:
    trained = []
    for start, end in offsets:
        if end > start:
            hit = any(start < b and end > a for a, b in spans)
        else:  # zero-width (a piece the tokenizer inserted): trained only inside a span
            hit = any(a <= start < b for a, b in spans)
        trained.append(hit)
    return trained


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def trained_by_prefixes(
    text: str, ids: Sequence[int], spans: Sequence[Span], tokenizer: Any
) -> list[bool]:
    """Slow tokenizers: the tokens wholly before character c are the ids that the
    tokenization of text[:c] shares with the whole text's."""

    def before(c: int) -> int:
        if c >= len(text):
            return len(ids)
        return _common_prefix(tokenizer(text[:c], add_special_tokens=False).input_ids, ids)

    trained = [False] * len(ids)
    for a, b in spans:
        for i in range(before(a), before(b) if b < len(text) else len(ids)):
            trained[i] = True
    return trained


def encode(
    texts: Sequence[str],
    spans: Sequence[Sequence[Span]],
    tokenizer: Any,
    special: SpecialTokens,
    *,
    add_eos: bool = True,
) -> list[Encoded]:
    """Encode a batch of texts with the special-token policy of `special`.

    Args:
        texts: the full rendered samples.
        spans: for each text, the character ranges whose tokens get labels.
        add_eos: end each sample with EOS (trained when the text's last span reaches its end)
            unless its last token already is EOS.
    Returns:
        one Encoded per text: [BOS] + tokens of the text + [EOS].
    """
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(
        list(texts), add_special_tokens=False, return_offsets_mapping=fast, verbose=False
    )
    out = []
    for k, (text, ids) in enumerate(zip(texts, enc.input_ids, strict=True)):
        row_spans = spans[k]
        if fast:
            trained = trained_by_offsets(enc.offset_mapping[k], row_spans)
        else:
            trained = trained_by_prefixes(text, ids, row_spans, tokenizer)
        ids = list(ids)
        if special.bos_id is not None and ids[:1] != [special.bos_id]:
            ids, trained = [special.bos_id, *ids], [False, *trained]
        if add_eos and ids[-1:] != [special.eos_id]:
            ends_trained = any(b >= len(text) for _, b in row_spans)
            ids, trained = [*ids, special.eos_id], [*trained, ends_trained]
        labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
        first = next((i for i, keep in enumerate(trained) if keep), len(ids))
        out.append(Encoded(ids, labels, first))
    return out
