import json
from pathlib import Path

import pytest

from llmtrain.config import DataSection, ModelSection, resolve_path
from llmtrain.data.rows import load_rows, squad_records
from llmtrain.data.tokenize import tokenize
from llmtrain.errors import ConfigError, DataError
from llmtrain.labels import IGNORE_INDEX
from llmtrain.model.load import load_tokenizer


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


# --- readers: values of the wrong kind, several files, caches -------------------------------


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("lines", "phrase"),
    [
        (['{"q": "a", "a": "b"}', '{"q": ["x", "y"], "a": "c"}'],
         "d.jsonl line 2: field 'q' holds a list where earlier rows hold text "
         "(first at d.jsonl line 1)"),
        (['{"q": "a", "a": 42}', "", '{"q": "b", "a": "forty"}'],
         "d.jsonl line 3: field 'a' holds text where earlier rows hold a number"),
        (['{"q": "a", "a": "b"}', '{"q": "c", "a": null}', '{"q": {"t": 1}, "a": "d"}'],
         "d.jsonl line 3: field 'q' holds an object where earlier rows hold text"),
        (['{"q": "a", "a": true}', '{"q": "c", "a": 1}'],
         "d.jsonl line 2: field 'a' holds a number where earlier rows hold a boolean"),
        (['{"q": "a", "m": [{"c": "x"}]}', '{"q": "b", "m": [{"c": ["y"]}]}'],
         "d.jsonl line 2: field 'm' holds list<item: struct<c: list<item: string>>> where "
         "earlier rows hold list<item: struct<c: string>>"),
    ],
)
def test_a_field_changing_type_names_line_field_and_both_types(
    tmp_path: Path, lines: list[str], phrase: str
) -> None:
    p = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as exc:
        load_rows(section(p))
    assert phrase in exc.value.problem
    assert "one type in every row" in exc.value.fix


def test_the_first_offending_row_is_found_among_many(tmp_path: Path) -> None:
    rows = [{"q": f"q{i}", "a": "x"} for i in range(500)]
    rows[377]["a"] = ["x"]
    p = jsonl(tmp_path, rows)
    with pytest.raises(DataError, match=r"d\.jsonl line 378: field 'a' holds a list"):
        load_rows(section(p))


def test_a_key_first_seen_in_a_later_row_is_a_column(tmp_path: Path) -> None:
    p = jsonl(tmp_path, [{"q": "a"}, {"q": "b", "a": "c"}])
    ds = load_rows(section(p))
    assert ds.column_names == ["q", "a"] and ds["a"] == [None, "c"]


@pytest.mark.parametrize(
    ("name", "data", "phrase"),
    [
        ("d.jsonl", b'{"q": "a", "a": "b"}\n{"q": "caf\xe9", "a": "c"}\n',
         "line 2 is not UTF-8 (byte 0xe9 at column 11)"),
        ("d.jsonl", '{"q": "a", "a": "b"}\n'.encode("utf-16"), "the file is UTF-16, not UTF-8"),
        ("d.json", b'[{"q": "a",\n  "a": "\xff"}]', "line 2 is not UTF-8 (byte 0xff at column 9)"),
        ("d.csv", b"q,a\nx,y\nz,\xe9t\xe9\n", "line 3 is not UTF-8 (byte 0xe9 at column 3)"),
        ("d.txt", b"one\n\ntwo \x80\n", "line 3 is not UTF-8 (byte 0x80 at column 5)"),
    ],
)
def test_bytes_that_are_not_utf8_are_named_by_line(
    tmp_path: Path, name: str, data: bytes, phrase: str
) -> None:
    p = write(tmp_path / name, data)
    cfg = section(p, shape="text") if name.endswith(".txt") else section(p)
    with pytest.raises(DataError) as exc:
        load_rows(cfg)
    assert phrase in exc.value.problem and str(p) in exc.value.problem
    assert "iconv" in exc.value.fix


def test_a_utf8_bom_is_not_part_of_the_first_row(tmp_path: Path) -> None:
    p = write(tmp_path / "d.jsonl", b'\xef\xbb\xbf{"q": "a", "a": "b"}\n')
    assert load_rows(section(p))[0] == {"q": "a", "a": "b"}
    c = write(tmp_path / "d.csv", b"\xef\xbb\xbfq,a\nx,y\n")
    assert load_rows(section(c)).column_names == ["q", "a"]


@pytest.mark.parametrize("key", ["train", "rows", "data"])
def test_json_object_with_rows_under_a_key_needs_data_field(tmp_path: Path, key: str) -> None:
    p = write(tmp_path / "d.json", json.dumps({"version": 2, key: [{"q": "a", "a": "b"}]}))
    with pytest.raises(DataError) as exc:
        load_rows(section(p))
    assert f"rows are under '{key}'" in exc.value.problem
    assert f"data.field={key}" in exc.value.fix
    assert load_rows(section(p, field=key))[0] == {"q": "a", "a": "b"}


def test_data_field_errors_name_the_keys_and_the_row(tmp_path: Path) -> None:
    p = write(tmp_path / "d.json", json.dumps({"train": [{"q": "a"}, "oops"], "n": 1}))
    with pytest.raises(DataError, match=r"'rows' is not a key .*\(keys: train, n\)"):
        load_rows(section(p, field="rows"))
    with pytest.raises(DataError, match=r"data\.field 'n' holds a JSON int"):
        load_rows(section(p, field="n"))
    with pytest.raises(DataError, match=r"row 2 \(under data.field 'train'\) is a JSON str"):
        load_rows(section(p, field="train"))
    with pytest.raises(ConfigError, match=r"data\.field 'train' is set but the data is jsonl"):
        load_rows(section(jsonl(tmp_path, [{"q": "a", "a": "b"}]), field="train"))


def test_several_files_are_read_in_sorted_order_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path / "d" / "b.jsonl", '{"q": "b1", "a": "x"}\n{"q": "b2", "a": "x"}\n')
    write(tmp_path / "d" / "a.jsonl", '{"q": "a1", "a": "x"}\n')
    write(tmp_path / "d" / "README.md", "not data\n")
    write(tmp_path / "d" / ".hidden.jsonl", "garbage\n")
    caplog.set_level("INFO")
    for path in (tmp_path / "d", tmp_path / "d" / "*.jsonl"):
        assert load_rows(section(path))["q"] == ["a1", "b1", "b2"]
        listed = "2 jsonl files, read in this order: a.jsonl (1 rows), b.jsonl (2 rows)"
        assert listed in caplog.text
        caplog.clear()


def test_several_csv_files_concatenate_and_jsonl_errors_name_the_line_in_its_file(
    tmp_path: Path,
) -> None:
    write(tmp_path / "c" / "1.csv", "q,a\nx,y\n")
    write(tmp_path / "c" / "2.csv", "q,a\nz,w\n")
    assert load_rows(section(tmp_path / "c"))["q"] == ["x", "z"]
    write(tmp_path / "j" / "1.jsonl", '{"q": "a", "a": "b"}\n')
    write(tmp_path / "j" / "2.jsonl", '{"q": "a", "a": "b"}\n\n{"q": 1, "a": "c"}\n')
    where = r"2\.jsonl line 3: field 'q' holds a number .*first at 1\.jsonl line 1"
    with pytest.raises(DataError, match=where):
        load_rows(section(tmp_path / "j"))


@pytest.mark.parametrize(
    ("files", "error", "phrase"),
    [
        ({"a.jsonl": '{"q": "a"}\n', "b.csv": "q\nx\n"}, ConfigError,
         "mixes file formats (csv: b.csv; jsonl: a.jsonl)"),
        ({"notes.md": "x"}, ConfigError, "is a directory without data files"),
        ({"a.csv": "q,a\nx,y\n", "b.csv": "q,b\nx,y\n"}, DataError,
         "b.csv has columns q, b but a.csv has q, a"),
    ],
)
def test_a_directory_of_mismatched_files_is_refused(
    tmp_path: Path, files: dict[str, str], error: type[Exception], phrase: str
) -> None:
    for name, text in files.items():
        write(tmp_path / "d" / name, text)
    with pytest.raises(error) as exc:
        load_rows(section(tmp_path / "d"))
    assert phrase in str(exc.value)


def test_a_glob_matching_nothing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"matches no files"):
        load_rows(section(tmp_path / "none" / "*.jsonl"))


@pytest.mark.parametrize(
    ("name", "data", "phrase"),
    [
        ("d.csv", "q,a\nx,y\nz,w,extra\n", "Expected 2 fields in line 3, saw 3"),
        ("d.csv", "", "No columns to parse from file"),
        ("d.parquet", "not a parquet file at all", "Parquet magic bytes not found"),
    ],
)
def test_csv_and_parquet_read_errors_are_data_errors_with_the_readers_message(
    tmp_path: Path, name: str, data: str, phrase: str
) -> None:
    p = write(tmp_path / name, data)
    with pytest.raises(DataError) as exc:
        load_rows(section(p))
    assert str(p) in exc.value.problem and phrase in exc.value.problem


def test_reading_leaves_no_datasets_cache_in_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    home = tmp_path / "home"
    home.mkdir()
    ds = datasets.Dataset.from_list([{"q": "a?", "a": "b"}, {"q": "c?", "a": "d"}])
    ds.to_csv(tmp_path / "d.csv")
    ds.to_parquet(tmp_path / "d.parquet")
    write(tmp_path / "d.txt", "one\n\ntwo\n")
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    before = sorted(cache.rglob("*")) if cache.exists() else []
    monkeypatch.setenv("HOME", str(home))
    for name in ("d.csv", "d.parquet", "d.txt"):
        cfg = section(tmp_path / name, shape="text") if name == "d.txt" else section(
            tmp_path / name)
        rows = load_rows(cfg)
        assert len(rows) == 2 and rows.cache_files == []  # in memory, not mapped from a cache
    assert list(home.rglob("*")) == []
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before


def test_csv_cells_are_the_text_the_file_holds(tmp_path: Path, tok) -> None:
    """pandas' type guessing would train `5` as `5.0` (an int column with a blank cell is
    float), `007` as `7`, `3.10` as `3.1`, `true` as `True`, and drop `None` or `NA` answers as
    missing: a CSV cell is text, and only a blank one is missing."""
    p = tmp_path / "d.csv"
    p.write_text("q,a\nx,5\ny,\nz,007\nw,3.10\nv,true\nu,None\nt,NA\n")
    cfg = section(p)
    rows = load_rows(cfg)
    assert rows["a"] == ["5", None, "007", "3.10", "true", "None", "NA"]
    ds, stats = tokenize(rows, tok, cfg)
    assert stats.dropped_empty == 1
    answers = [tok.decode([t for t, lab in zip(ids, labels, strict=True)
                           if lab != IGNORE_INDEX and t != tok.eos_token_id]).strip()
               for ids, labels in zip(ds["input_ids"], ds["labels"], strict=True)]
    assert answers == ["5", "007", "3.10", "true", "None", "NA"]
    # files of one directory agree on types whatever their cells look like
    write(tmp_path / "d" / "a.csv", "q,a\nx,y\n")
    write(tmp_path / "d" / "b.csv", "q,a\nx,3\n")
    assert load_rows(section(tmp_path / "d"))["a"] == ["y", "3"]


def test_json_numbers_render_as_the_file_writes_them(tmp_path: Path, tok) -> None:
    """Arrow reads ints next to floats as floats, and booleans after numbers as numbers: `5`
    was trained as `5.0` and `true` as `1.0`; an int beyond 64 bits was a traceback (exit 1)."""
    rows = [{"q": "a", "a": 5}, {"q": "b", "a": 2.5}, {"q": "d", "a": None},
            {"q": "e", "a": 7, "id": 12345678901234567890}]
    cfg = section(jsonl(tmp_path, rows))
    loaded = load_rows(cfg)
    assert loaded["a"] == ["5", "2.5", None, "7"]
    assert loaded["id"][3] == "12345678901234567890"
    ds, _ = tokenize(loaded, tok, cfg)
    assert "5.0" not in tok.decode(ds["input_ids"][0])
    assert tok.decode(ds["input_ids"][0]).endswith("A: 5</s>")
    with pytest.raises(DataError) as exc:
        load_rows(section(jsonl(tmp_path, [{"q": "a", "a": 5}, {"q": "c", "a": True}])))
    assert exc.value.problem.startswith(
        "d.jsonl line 2: field 'a' holds a boolean where earlier rows hold a number")


def test_a_value_of_several_types_inside_one_row_is_a_data_error(tmp_path: Path) -> None:
    """A turn whose content is a list (or a number) next to a text turn in the same row: Arrow
    cannot convert that row alone, which was a traceback (exit 1, requeued) for exit 65."""
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                        {"role": "assistant", "content": "a"}]}
    for rows, line in (([good, bad], 2), ([bad, good], 1)):
        p = jsonl(tmp_path, rows)
        with pytest.raises(DataError) as exc:
            load_rows(DataSection(path=str(p), shape="chat", chat_template="chatml"))
        assert exc.value.problem.startswith(
            f"d.jsonl line {line}: field 'messages' mixes types inside one value")
