"""Names the `vocab` and `lep` verbs offer as choices; here, without the libraries that
implement them, so that `llmtrain vocab --help` parses without importing tokenizers or torch."""

from __future__ import annotations

from typing import Literal

Kind = Literal["sentencepiece", "byte-level"]
SENTENCEPIECE: Kind = "sentencepiece"
BYTE_LEVEL: Kind = "byte-level"

# How `lep` carries the adapted embeddings to the instruct model (see vocab/propagate.py).
Mode = Literal["conversion", "overlap", "swap"]
MODES: tuple[Mode, ...] = ("conversion", "overlap", "swap")
