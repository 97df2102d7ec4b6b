"""Session fixtures: the tiny base tokenizers and models of tests/vocab/tiny.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from llmtrain.vocab.build import train_byte_level, train_sentencepiece

from .tiny import EN, lines, save, tiny_model, train_steps


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """LLaMA-2 style: SentencePiece BPE with byte fallback, English only."""
    return train_sentencepiece([EN], 600, tmp_path_factory.mktemp("sp-en"))


@pytest.fixture(scope="session")
def bl_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    """LLaMA-3 style: byte-level BPE, special tokens after the vocabulary, English only."""
    return train_byte_level([EN], 600, tmp_path_factory.mktemp("bl-en"))


@pytest.fixture(scope="session")
def base_dir(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[PreTrainedTokenizerFast, bool], Path]:
    """A saved tiny base model for a tokenizer, trained a little on English; cached."""
    made: dict[tuple[str, bool], Path] = {}

    def make(tok: PreTrainedTokenizerFast, tied: bool) -> Path:
        key = (tok.name_or_path, tied)
        if key not in made:
            model = tiny_model(tok, tied=tied, seed=1)
            train_steps(model, tok, lines(EN), steps=10, seed=1)
            made[key] = save(model, tok, tmp_path_factory.mktemp("base"))
        return made[key]

    return make
