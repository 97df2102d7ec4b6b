"""How compactly tokenizers encode a text: characters per token and tokens per word."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from llmtrain.errors import ConfigError, DataError


@dataclass(frozen=True)
class TokenizerStats:
    name: str
    vocab_size: int
    characters: int
    words: int
    tokens: int

    @property
    def chars_per_token(self) -> float:
        return self.characters / self.tokens

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / self.words


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file, without their line ends.

    Raises:
        ConfigError: the file does not exist (exit 64).
        DataError: it is not UTF-8 or holds no text (exit 65)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"text file {path} not found", "pass an existing file") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text: {err}", "convert it to UTF-8") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{path} has no text", "pass a file with text")
    return lines


def measure(tok: PreTrainedTokenizerFast, lines: Sequence[str], name: str) -> TokenizerStats:
    """Counts over `lines`, each encoded on its own without special tokens."""
    ids = tok(list(lines), add_special_tokens=False)["input_ids"]
    return TokenizerStats(
        name=name,
        vocab_size=len(tok),
        characters=sum(len(line) for line in lines),
        words=sum(len(line.split()) for line in lines),
        tokens=sum(len(i) for i in ids),
    )


def format_table(rows: Sequence[TokenizerStats]) -> str:
    width = max(len("tokenizer"), *(len(r.name) for r in rows))
    lines = [
        f"{'tokenizer':<{width}}  {'vocab':>8}  {'tokens':>10}  "
        f"{'chars/token':>11}  {'tokens/word':>11}"
    ]
    for r in rows:
        lines.append(
            f"{r.name:<{width}}  {r.vocab_size:>8}  {r.tokens:>10}  "
            f"{r.chars_per_token:>11.3f}  {r.tokens_per_word:>11.3f}"
        )
    return "\n".join(lines)
