"""`vocab train` and `vocab extend` on the two tokenizer styles."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from llmtrain.cli import main
from llmtrain.errors import ConfigError, DataError
from llmtrain.vocab.build import (
    extend_tokenizer,
    load_tokenizer,
    tokenizer_kind,
    train_byte_level,
    train_sentencepiece,
)

from .tiny import EN, RU, lines

ODD = "Год 2024, цена 347 руб. — 😀 ∑ façade"


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_has_byte_fallback_and_split_digits(model_type: str, tmp_path: Path) -> None:
    tok = train_sentencepiece([RU], 700, tmp_path, model_type=model_type)  # type: ignore[arg-type]
    assert tokenizer_kind(tok) == "sentencepiece"
    assert len(tok) == 700
    assert (tok.unk_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    pieces = tok.tokenize("число 2024")
    assert pieces[-4:] == ["2", "0", "2", "4"]
    assert "<0xF0>" in tok.tokenize("😀")  # not in the corpus: falls back to UTF-8 bytes
    assert tok.unk_token_id not in tok(ODD).input_ids
    assert tok.decode(tok(ODD).input_ids, skip_special_tokens=True) == ODD
    assert (tmp_path / "tokenizer.model").is_file()  # the slow tokenizer is there too


def test_byte_level_is_llama3_style(tmp_path: Path) -> None:
    tok = train_byte_level([RU], 700, tmp_path)
    assert tokenizer_kind(tok) == "byte-level"
    assert tok.bos_token_id == 700 and tok.eos_token_id == 701  # specials after the vocabulary
    ids = tok(ODD).input_ids
    assert ids[0] == tok.bos_token_id and len(ids) < len(ODD.encode())
    assert tok.decode(ids, skip_special_tokens=True) == ODD
    assert tok.model_input_names == ["input_ids", "attention_mask"]
    split = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("12345 ab")
    assert [piece for piece, _ in split] == ["123", "45", "Ġab"]  # LLaMA-3's regex split


def test_train_like_a_base_keeps_its_conventions(
    bl_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    base = load_tokenizer(bl_tokenizer.name_or_path)
    base.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    base.chat_template = "{{ messages[0]['content'] }}<|eot_id|>"
    base.save_pretrained(str(tmp_path / "base"))
    assert (
        main(
            [
                "vocab",
                "train",
                "--like",
                str(tmp_path / "base"),
                "--text",
                str(RU),
                "--vocab-size",
                "800",
                "--out",
                str(tmp_path / "new"),
            ]
        )
        == 0
    )
    new = load_tokenizer(tmp_path / "new")
    assert tokenizer_kind(new) == "byte-level"
    assert (new.bos_token, new.eos_token) == (base.bos_token, base.eos_token)
    assert new.additional_special_tokens == ["<|eot_id|>"]
    assert new.chat_template == base.chat_template
    assert new(ODD).input_ids[0] == new.bos_token_id == 800  # post-processor follows the new ids


def _check_extension(
    base: PreTrainedTokenizerFast, new: PreTrainedTokenizerFast, out: Path
) -> None:
    ext, appended = extend_tokenizer(base, new, out)
    ext = load_tokenizer(out)
    old_vocab, ext_vocab = base.get_vocab(), ext.get_vocab()
    assert all(ext_vocab[t] == i for t, i in old_vocab.items())  # no old id moves
    assert appended and len(ext) == len(base) + len(appended)
    assert sorted(ext_vocab[t] for t in appended) == list(range(len(base), len(ext)))
    assert (ext.bos_token_id, ext.eos_token_id) == (base.bos_token_id, base.eos_token_id)
    for text in (lines(RU)[3], lines(EN)[3], ODD):
        assert ext.decode(ext(text).input_ids, skip_special_tokens=True) == text
    ru = "\n".join(lines(RU))
    assert len(ext(ru).input_ids) < 0.5 * len(base(ru).input_ids)
    assert not (out / "tokenizer.model").exists()  # a stale slow tokenizer would disagree


def test_extend_sentencepiece(sp_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    new = train_sentencepiece([RU], 900, tmp_path / "ru", like=sp_tokenizer)
    _check_extension(sp_tokenizer, new, tmp_path / "ext")


def test_extend_byte_level_keeps_specials_after_old_vocab(
    bl_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    new = train_byte_level([RU], 900, tmp_path / "ru", like=bl_tokenizer)
    _check_extension(bl_tokenizer, new, tmp_path / "ext")


def test_extend_refuses_other_style(
    sp_tokenizer: PreTrainedTokenizerFast, bl_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="sentencepiece style but the new one is byte-level"):
        extend_tokenizer(sp_tokenizer, bl_tokenizer, tmp_path)


def test_extend_refuses_other_algorithm(
    sp_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    unigram = train_sentencepiece([RU], 700, tmp_path / "u", model_type="unigram")
    with pytest.raises(ConfigError, match="BPE but the new one is Unigram"):
        extend_tokenizer(sp_tokenizer, unigram, tmp_path / "ext")


def test_user_errors_exit_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = ["vocab", "train", "--vocab-size", "100", "--out", str(tmp_path / "o"), "--text"]
    assert main([*args, str(empty)]) == DataError.exit_code
    assert main([*args, str(tmp_path / "missing.txt")]) == ConfigError.exit_code
    assert (
        main(
            [
                "vocab",
                "train",
                "--vocab-size",
                "100000",
                "--out",
                str(tmp_path / "o"),
                "--text",
                str(EN),
            ]
        )
        == DataError.exit_code
    )
    assert (
        main(["vocab", "stats", "--text", str(EN), str(tmp_path / "nothing")])
        == ConfigError.exit_code
    )
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("fix:") == 4
