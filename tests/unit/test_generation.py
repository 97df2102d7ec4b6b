"""Generation passes the model only what it takes, whatever the tokenizer returns."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llmtrain.config import GenerationSection, ModelSection
from llmtrain.model.generation import generate
from llmtrain.model.load import load_tokenizer
from tests.tiny_models import tiny_model


def plain_fast_tokenizer(tmp_path: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer behind a plain PreTrainedTokenizerFast, as tiny test models and
    some hub models ship: its model_input_names include token_type_ids (the class's default in
    transformers 4.37.2; 5.x's default leaves them out, so they are named, as such models'
    tokenizer_config.json does)."""
    words = ["<unk>", "<pad>", "</s>", "Q:", "A:", "one", "two", "three", "plus", "is"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    ).save_pretrained(tmp_path)
    return load_tokenizer(ModelSection(path=str(tmp_path)))


def test_a_tokenizer_that_returns_token_type_ids_generates(tmp_path: Path) -> None:
    tok = plain_fast_tokenizer(tmp_path)
    model = tiny_model("llama")
    batch = tok(["Q: one plus two is", "Q: three"], padding=True, return_tensors="pt")
    assert "token_type_ids" in batch  # the tokenizer does return them ...
    with pytest.raises(ValueError, match="token_type_ids"):
        model.generate(**batch, max_new_tokens=2, pad_token_id=tok.pad_token_id)  # ... and
    # passing everything the tokenizer returns fails: the fault this guards against.
    gen = GenerationSection(max_new_tokens=3, batch_size=2)
    outputs = generate(model, tok, ["Q: one plus two is", "Q: three", "A: one"], gen)
    assert len(outputs) == 3 and all(isinstance(o, str) for o in outputs)
