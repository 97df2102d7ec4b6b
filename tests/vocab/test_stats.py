"""`vocab stats`: characters per token and tokens per word, side by side."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from llmtrain.cli import main
from llmtrain.vocab.build import train_sentencepiece
from llmtrain.vocab.stats import measure

from .tiny import RU


def test_counts_are_those_of_the_text(sp_tokenizer: PreTrainedTokenizerFast) -> None:
    text = ["два слова", "  ", "и ещё три"]
    stats = measure(sp_tokenizer, [t for t in text if t.strip()], "base")
    tokens = len(sp_tokenizer("два слова", add_special_tokens=False).input_ids) + len(
        sp_tokenizer("и ещё три", add_special_tokens=False).input_ids
    )
    assert (stats.characters, stats.words, stats.tokens) == (18, 5, tokens)
    assert stats.chars_per_token == pytest.approx(18 / tokens)
    assert stats.tokens_per_word == pytest.approx(tokens / 5)


def test_table_compares_tokenizers(
    sp_tokenizer: PreTrainedTokenizerFast, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_sentencepiece([RU], 900, tmp_path / "ru", like=sp_tokenizer)
    capsys.readouterr()
    assert (
        main(["vocab", "stats", "--text", str(RU), sp_tokenizer.name_or_path, str(tmp_path / "ru")])
        == 0
    )
    header, old, new = capsys.readouterr().out.splitlines()
    assert header.split() == ["tokenizer", "vocab", "tokens", "chars/token", "tokens/word"]
    old_cpt, new_cpt = float(old.split()[3]), float(new.split()[3])
    assert old.split()[1:2] == ["600"] and new.split()[1:2] == ["900"]
    assert new_cpt > 3 * old_cpt  # Russian pieces instead of UTF-8 bytes
