"""What llmtrain saves on the current stack loads on the pinned one: tokenizers 0.20 and later
write BPE merges as pairs (["a", "b"]), which the pinned stack's tokenizers 0.15 cannot parse
(found by merging a current-stack adapter on the pinned stack: exit 64 at its tokenizer.json).
support.write_portable_tokenizer writes them as "a b" strings, which every release reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from llmtrain.config import ModelSection
from llmtrain.model import support
from llmtrain.model.load import load_tokenizer

TEXTS = ["Hello world, 123 tokens!", "  two  spaces\nand a line", "ünïcödé and 中文"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    """The embedded tiny Llama's tokenizer saved with pair merges, as tokenizers 0.20+ write it,
    and the ids its own backend gives TEXTS."""
    tokenizer = load_tokenizer(ModelSection(path="embedded:tiny-llama"))
    out = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(str(out))
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    assert merges, "the test needs a BPE tokenizer with merges"
    data["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in merges]
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    ids = [tokenizer.backend_tokenizer.encode(t).ids for t in TEXTS]
    return out, ids


def test_pair_merges_become_strings_that_this_stack_reads_to_the_same_ids(
    saved: tuple[Path, list[list[int]]], tmp_path: Path
) -> None:
    source, ids = saved
    (tmp_path / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    assert support.write_portable_tokenizer(tmp_path)
    merges = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"]
    pairs = json.loads((source / "tokenizer.json").read_text())["model"]["merges"]
    assert merges == [" ".join(p) for p in pairs]  # the same merges, in the same order
    rewritten = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert [rewritten.encode(t).ids for t in TEXTS] == ids
    assert not support.write_portable_tokenizer(tmp_path)  # strings already: left as they are


def test_merges_whose_pieces_hold_a_space_are_left_as_pairs(tmp_path: Path) -> None:
    data = {"model": {"type": "BPE", "merges": [["a b", "c"], ["d", "e"]]}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert not support.write_portable_tokenizer(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == data


def test_a_directory_without_tokenizer_json_is_left_alone(tmp_path: Path) -> None:
    assert not support.write_portable_tokenizer(tmp_path)
    assert list(tmp_path.iterdir()) == []
