"""`vocab init`: subtoken-mean rows, copied specials and bytes, tied and untied heads, configs."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from llmtrain.cli import main
from llmtrain.errors import ConfigError
from llmtrain.vocab.build import extend_tokenizer, train_byte_level, train_sentencepiece
from llmtrain.vocab.resize import init_model_dir, is_tied, load_model

from .tiny import RU, lines

BaseDir = Callable[[PreTrainedTokenizerFast, bool], Path]


@pytest.fixture(scope="module")
def sp_extended(
    sp_tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """LLaMA-2 style base tokenizer extended with Russian pieces."""
    ru = train_sentencepiece([RU], 900, tmp_path_factory.mktemp("sp-ru"), like=sp_tokenizer)
    out = tmp_path_factory.mktemp("sp-ext")
    extend_tokenizer(sp_tokenizer, ru, out)
    return out


@pytest.fixture(scope="module")
def bl_replaced(
    bl_tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A LLaMA-3 style tokenizer trained on Russian only, to replace the English one."""
    out = tmp_path_factory.mktemp("bl-ru")
    train_byte_level([RU], 1000, out, like=bl_tokenizer)
    return out


def _rows(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        model.get_input_embeddings().weight.detach(),
        model.get_output_embeddings().weight.detach(),
    )


def _check_means(
    old_model: PreTrainedModel,
    new_model: PreTrainedModel,
    samples: dict[int, list[int]],
) -> None:
    old_in, old_head = _rows(old_model)
    new_in, new_head = _rows(new_model)
    assert len(samples) >= 20
    for new_id, old_ids in samples.items():
        assert len(old_ids) > 1
        torch.testing.assert_close(new_in[new_id], old_in[old_ids].mean(0))
        torch.testing.assert_close(new_head[new_id], old_head[old_ids].mean(0))
        # Each matrix from its own rows: the head row is not the embedding mean.
        assert not torch.allclose(new_head[new_id], old_in[old_ids].mean(0))


def test_sentencepiece_mean_matches_sentencepiece_split(
    sp_tokenizer: PreTrainedTokenizerFast, sp_extended: Path, base_dir: BaseDir, tmp_path: Path
) -> None:
    base = base_dir(sp_tokenizer, False)
    init_model_dir(base, sp_extended, tmp_path)
    new_vocab = PreTrainedTokenizerFast.from_pretrained(str(tmp_path)).get_vocab()
    # The oracle: the base's SentencePiece model itself, on the token's text.
    sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    words = [t for t, i in new_vocab.items() if i >= len(sp_tokenizer) and t.startswith("▁")]
    samples = {
        new_vocab[t]: sp.encode(t[1:].replace("▁", " ")) for t in random.Random(0).sample(words, 40)
    }
    _check_means(
        load_model(base),
        load_model(tmp_path),
        {i: ids for i, ids in samples.items() if len(ids) > 1},
    )


def test_byte_level_mean_matches_old_encoding(
    bl_tokenizer: PreTrainedTokenizerFast, bl_replaced: Path, base_dir: BaseDir, tmp_path: Path
) -> None:
    base = base_dir(bl_tokenizer, False)
    init_model_dir(base, bl_replaced, tmp_path)
    new = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    samples = {}
    for token, new_id in sorted(new.get_vocab().items()):
        text = new.convert_tokens_to_string([token])
        if token not in bl_tokenizer.get_vocab() and "�" not in text and not new_id >= 1000:
            samples[new_id] = bl_tokenizer.encode(text, add_special_tokens=False)
    picked = dict(random.Random(0).sample(sorted(samples.items()), 40))
    _check_means(load_model(base), load_model(tmp_path), picked)


def test_specials_and_bytes_are_copied(
    sp_tokenizer: PreTrainedTokenizerFast,
    bl_tokenizer: PreTrainedTokenizerFast,
    sp_extended: Path,
    bl_replaced: Path,
    base_dir: BaseDir,
    tmp_path: Path,
) -> None:
    cases = [
        (sp_tokenizer, sp_extended, ["<unk>", "<s>", "</s>", "<0xD0>", "<0xF0>", "▁the"]),
        (bl_tokenizer, bl_replaced, ["<|begin_of_text|>", "<|end_of_text|>", "Ð", "a"]),
    ]
    for n, (old_tok, new_dir, tokens) in enumerate(cases):
        base = base_dir(old_tok, False)
        init_model_dir(base, new_dir, tmp_path / str(n))
        new_tok = PreTrainedTokenizerFast.from_pretrained(str(new_dir))
        old_in, old_head = _rows(load_model(base))
        new_in, new_head = _rows(load_model(tmp_path / str(n)))
        for t in tokens:
            o, w = old_tok.convert_tokens_to_ids(t), new_tok.convert_tokens_to_ids(t)
            assert torch.equal(new_in[w], old_in[o]) and torch.equal(new_head[w], old_head[o]), t
    # The replaced vocabulary moved the specials: 600/601 -> 1000/1001.
    assert new_tok.bos_token_id == 1000 != bl_tokenizer.bos_token_id


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_reload_logits_and_tying(
    tied: bool,
    sp_tokenizer: PreTrainedTokenizerFast,
    sp_extended: Path,
    base_dir: BaseDir,
    tmp_path: Path,
) -> None:
    base = base_dir(sp_tokenizer, tied)
    old = load_model(base)
    assert main(["vocab", "init", str(base), str(sp_extended), "--out", str(tmp_path)]) == 0
    new = load_model(tmp_path)
    assert is_tied(new) == tied and new.config.tie_word_embeddings == tied
    if not tied:
        assert (
            new.get_output_embeddings().weight.data_ptr()
            != new.get_input_embeddings().weight.data_ptr()
        )
    # Old tokens keep their rows, so the old columns of the logits do not move.
    ids = sp_tokenizer([*lines(RU)[:2], "the town by the river"], return_tensors="pt", padding=True)
    with torch.no_grad():
        old_logits = old(**ids).logits
        new_logits = new(**ids).logits
    torch.testing.assert_close(new_logits[..., : old_logits.shape[-1]], old_logits)
    # Saving and loading again gives the same logits, new columns included.
    new.save_pretrained(str(tmp_path / "again"))
    again = load_model(tmp_path / "again")
    assert is_tied(again) == tied
    with torch.no_grad():
        torch.testing.assert_close(again(**ids).logits, new_logits, rtol=0, atol=0)


def test_configs_follow_the_new_ids(
    bl_tokenizer: PreTrainedTokenizerFast, bl_replaced: Path, base_dir: BaseDir, tmp_path: Path
) -> None:
    base = base_dir(bl_tokenizer, True)
    assert json.loads((base / "config.json").read_text())["bos_token_id"] == 600
    assert (
        main(
            [
                "vocab",
                "init",
                str(base),
                str(bl_replaced),
                "--out",
                str(tmp_path),
                "--pad-to-multiple-of",
                "64",
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "config.json").read_text())
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert config["vocab_size"] == 1024  # 1002 tokens rounded up to a multiple of 64
    assert (config["bos_token_id"], config["eos_token_id"]) == (1000, 1001)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1000, 1001)
    assert config["tie_word_embeddings"] is True
    # Padding rows have no token: they start at the mean of all old rows.
    old_in = load_model(base).get_input_embeddings().weight.detach()
    new_in = load_model(tmp_path).get_input_embeddings().weight.detach()
    torch.testing.assert_close(new_in[1002:], old_in.mean(0).expand(22, -1))


def test_init_refuses_another_style(
    sp_tokenizer: PreTrainedTokenizerFast, bl_replaced: Path, base_dir: BaseDir, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="byte-level style but the model's is sentencepiece"):
        init_model_dir(base_dir(sp_tokenizer, False), bl_replaced, tmp_path)
