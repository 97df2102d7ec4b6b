import json
from pathlib import Path

import pytest

from llmtrain.config import DataSection, ModelSection, resolve_path
from llmtrain.data import IGNORE_INDEX, load_rows, squad_records, tokenize
from llmtrain.errors import ConfigError, DataError
from llmtrain.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelSection(path="embedded:tiny-llama"))


def section(path: Path | str, **kw) -> DataSection:
    base = {"prompt_template": "Q: {q}\nA:", "response_template": " {a}"}
    return DataSection(path=str(path), **{**base, **kw})


def jsonl(tmp_path: Path, rows: list[dict]) -> Path:
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_prompt_tokens_are_masked_response_and_eos_are_not(tmp_path: Path, tok) -> None:
    cfg = section(jsonl(tmp_path, [{"q": "What is 2 plus 3?", "a": "5"}]))
    ds, stats = tokenize(load_rows(cfg), tok, cfg)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    n_prompt = len(tok("Q: What is 2 plus 3?\nA:").input_ids)
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id
    assert tok.decode(ids[n_prompt:-1]).strip() == "5"
    assert stats.loss_tokens == len(ids) - n_prompt


def test_overflow_truncate_and_drop_are_counted(tmp_path: Path, tok) -> None:
    rows = [{"q": "short", "a": "x"}, {"q": "short", "a": "seven " * 40}]
    path = jsonl(tmp_path, rows)
    ds, stats = tokenize(load_rows(section(path, max_length=24)), tok, section(path, max_length=24))
    assert (stats.kept, stats.truncated) == (2, 1) and max(len(x) for x in ds["input_ids"]) == 24
    cfg = section(path, max_length=24, overflow="drop")
    ds, stats = tokenize(load_rows(cfg), tok, cfg)
    assert (stats.kept, stats.dropped_too_long) == (1, 1)


def test_prompt_longer_than_max_length_leaves_no_rows(tmp_path: Path, tok) -> None:
    cfg = section(jsonl(tmp_path, [{"q": "many words " * 30, "a": "1"}]), max_length=16)
    with pytest.raises(DataError, match=r"raise data\.max_length"):
        tokenize(load_rows(cfg), tok, cfg)


def test_invalid_jsonl_line_reported_with_its_number(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text('{"q": "a", "a": "b"}\n\n{"q": broken}\n')
    with pytest.raises(DataError, match="line 3 is not valid JSON"):
        load_rows(section(p))


def test_text_blocks_packing_puts_eos_between_documents(tmp_path: Path, tok) -> None:
    p = tmp_path / "t.txt"
    p.write_text("one two three four five\n\nsix seven eight nine\n\nten eleven twelve\n")
    cfg = DataSection(path=str(p), shape="text", packing="blocks", max_length=8)
    ds, stats = tokenize(load_rows(cfg), tok, cfg)
    assert all(len(x) == 8 for x in ds["input_ids"])
    flat = [t for x in ds["input_ids"] for t in x]
    assert flat.count(tok.eos_token_id) >= 2
    assert ds["labels"] == ds["input_ids"]
    assert stats.extra["packed_from_documents"] == 3


def test_csv_and_parquet_and_disk_sources(tmp_path: Path, tok) -> None:
    import datasets

    ds = datasets.Dataset.from_list([{"q": "a?", "a": "b"}, {"q": "c?", "a": "d"}])
    ds.to_csv(tmp_path / "d.csv")
    ds.to_parquet(tmp_path / "d.parquet")
    ds.save_to_disk(str(tmp_path / "saved"))
    for source in ("d.csv", "d.parquet", "saved"):
        assert len(load_rows(section(tmp_path / source))) == 2


def test_squad_json_becomes_records_with_nested_answers(tmp_path: Path, tok) -> None:
    doc = {"version": "v2.0", "data": [{"title": "T", "paragraphs": [{
        "context": "Tokyo is the capital.",
        "qas": [{"id": "q1", "question": "What is the capital?",
                 "answers": [{"text": "Tokyo", "answer_start": 0}], "is_impossible": False}],
    }]}]}
    assert squad_records(doc)[0]["answers"] == {"text": ["Tokyo"], "answer_start": [0]}
    p = tmp_path / "squad.json"
    p.write_text(json.dumps(doc, ensure_ascii=False))
    cfg = DataSection(path=str(p), prompt_template="{context}\n{question}\n",
                      response_template="{answers[text][0]}")
    ds, _ = tokenize(load_rows(cfg), tok, cfg)
    assert "Tokyo" in tok.decode(ds[0]["input_ids"])


def test_missing_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_rows(section("nowhere/data.jsonl"))


def test_embedded_paths_resolve_into_the_package() -> None:
    assert Path(resolve_path("embedded:arith.jsonl")).is_file()
