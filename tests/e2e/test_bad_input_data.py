"""Bad data files through the real CLI: `validate` and `finetune` exit with the same code (65
bad data, 64 bad config) and the same message naming the file, the line or row, the field and
the fix; no traceback, nothing written to output.dir. Also: several files read as one, and no
datasets cache left in $HOME."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow
LORA = yaml.safe_load((REPO / "configs" / "lora.yaml").read_text())
ROW = '{"question": "What is 1 plus 1?", "answer": "2"}\n'


def config(tmp_path: Path, **data: object) -> str:
    raw = json.loads(json.dumps(LORA))
    raw["data"].update(data)
    raw["data"]["eval_fraction"] = 0.0
    raw["output"] = {"dir": str(tmp_path / "out"), "merge": False}
    raw["training"].update(max_steps=2, save_steps=2)
    raw["generation"]["samples"] = 0
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def put(tmp_path: Path, name: str, data: str | bytes) -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return str(path)


def rows(*answers: object) -> str:
    return "".join(json.dumps({"question": f"q{i}", "answer": a}) + "\n"
                   for i, a in enumerate(answers))


# name -> (builds the config in tmp_path, exit code, phrases the message must hold)
Case = tuple[Callable[[Path], str], int, list[str]]
CASES: dict[str, Case] = {
    "list where text": (
        lambda t: config(t, path=put(t, "d.jsonl", rows("2", "3", ["4", "four"]))),
        65, ["d.jsonl line 3: field 'answer' holds a list where earlier rows hold text",
             "fix: give 'answer' one type in every row"]),
    "text after numbers": (
        lambda t: config(t, path=put(t, "d.jsonl", rows(2, 3, "four"))),
        65, ["d.jsonl line 3: field 'answer' holds text where earlier rows hold a number"]),
    "object where text": (
        lambda t: config(t, path=put(t, "d.jsonl", rows("2", {"text": "3"}))),
        65, ["d.jsonl line 2: field 'answer' holds an object where earlier rows hold text"]),
    "latin-1 jsonl": (
        lambda t: config(t, path=put(t, "d.jsonl", ROW.encode() + b'{"question": "caf\xe9"}\n')),
        65, ["d.jsonl: line 2 is not UTF-8 (byte 0xe9 at column 18)", "fix: convert the file"]),
    "utf-16 jsonl": (
        lambda t: config(t, path=put(t, "d.jsonl", ROW.encode("utf-16"))),
        65, ["d.jsonl: the file is UTF-16, not UTF-8", "iconv -f UTF-16 -t UTF-8"]),
    "latin-1 csv": (
        lambda t: config(t, path=put(t, "d.csv", b"question,answer\nq,a\nq\xe9,b\n")),
        65, ["d.csv: line 3 is not UTF-8 (byte 0xe9 at column 2)"]),
    "latin-1 text": (
        lambda t: config(t, path=put(t, "d.txt", b"one two\n\nthree f\xfcnf\n"), shape="text"),
        65, ["d.txt: line 3 is not UTF-8 (byte 0xfc at column 8)"]),
    "json object with train key": (
        lambda t: config(t, path=put(t, "d.json", json.dumps(
            {"version": 1, "train": [json.loads(ROW)]}))),
        65, ["d.json: the top level is a JSON object (keys: version, train)",
             "rows are under 'train'", "fix: set data.field=train"]),
    "json object with rows key": (
        lambda t: config(t, path=put(t, "d.json", json.dumps({"rows": [json.loads(ROW)]}))),
        65, ["rows are under 'rows'", "fix: set data.field=rows"]),
    "data.field not a key": (
        lambda t: config(t, path=put(t, "d.json", json.dumps({"rows": [json.loads(ROW)]})),
                         field="train"),
        65, ["d.json: data.field 'train' is not a key of the top-level object (keys: rows)"]),
    "json row not an object": (
        lambda t: config(t, path=put(t, "d.json", json.dumps(
            {"rows": [json.loads(ROW), "oops"]})), field="rows"),
        65, ["d.json: row 2 (under data.field 'rows') is a JSON str, not an object"]),
    "data.field on jsonl": (
        lambda t: config(t, path=put(t, "d.jsonl", ROW), field="rows"),
        64, ["data.field 'rows' is set but the data is jsonl, not JSON", "fix: drop data.field"]),
    "ragged csv": (
        lambda t: config(t, path=put(t, "d.csv", "question,answer\nq,a\nq,b,c\n")),
        65, ["d.csv: not readable as csv", "Expected 2 fields in line 3, saw 3"]),
    "corrupt parquet": (
        lambda t: config(t, path=put(t, "d.parquet", "PAR1 but not really")),
        65, ["d.parquet: not readable as parquet", "Parquet magic bytes not found"]),
    "directory of mixed formats": (
        lambda t: (put(t, "dd/a.jsonl", ROW), put(t, "dd/b.csv", "question,answer\nq,a\n"),
                   config(t, path=str(t / "dd")))[-1],
        64, ["mixes file formats (csv: b.csv; jsonl: a.jsonl)", "data.sources"]),
    "glob of mixed formats": (
        lambda t: (put(t, "dd/a.jsonl", ROW), put(t, "dd/b.json", "[]"),
                   config(t, path=str(t / "dd" / "*.js*")))[-1],
        64, ["mixes file formats (json: b.json; jsonl: a.jsonl)"]),
    "glob matching nothing": (
        lambda t: config(t, path=str(t / "nothing" / "*.jsonl")), 64, ["matches no files"]),
    "directory without data files": (
        lambda t: (put(t, "dd/notes.md", "x"), config(t, path=str(t / "dd")))[-1],
        64, ["is a directory without data files", "save_to_disk"]),
    "second file of a directory": (
        lambda t: (put(t, "dd/1.jsonl", rows("2")), put(t, "dd/2.jsonl", "\n" + rows(3)),
                   config(t, path=str(t / "dd")))[-1],
        65, ["2.jsonl line 2: field 'answer' holds a number where earlier rows hold text "
             "(first at 1.jsonl line 1)"]),
    "csv files with other columns": (
        lambda t: (put(t, "dd/1.csv", "question,answer\nq,a\n"),
                   put(t, "dd/2.csv", "question,reply\nq,a\n"), config(t, path=str(t / "dd")))[-1],
        65, ["2.csv has columns question, reply but 1.csv has question, answer"]),
    "special token's text in an answer": (
        lambda t: config(t, path=put(t, "d.jsonl", rows("2", "It ends with </s> here."))),
        65, ["a row of the data holds the text of one of the tokenizer's special tokens",
             "d.jsonl line 2: {answer} holds '</s>'",
             "fix: remove the token's text from those rows, or set data.special_tokens_in_text"]),
    "bad row after the rows validate tokenizes": (
        lambda t: config(t, path=put(t, "d.jsonl", rows(*["2"] * 2000, "ok </s>"))),
        65, ["d.jsonl line 2001: {answer} holds '</s>'"]),
}


def error_text(stderr: str, verb: str) -> str:
    """The error paragraph, from `llmtrain VERB: error:` to the end."""
    match = re.search(rf"llmtrain {verb}: error: (.*)", stderr, re.S)
    assert match, stderr
    return match.group(1).strip()


@pytest.mark.parametrize("name", sorted(CASES))
def test_validate_and_finetune_refuse_bad_data_alike(name: str, tmp_path: Path) -> None:
    make, code, phrases = CASES[name]
    cfg = make(tmp_path)
    messages = {}
    for verb in ("validate", "finetune"):
        result = run_cli(verb, cfg, cwd=tmp_path)
        assert result.returncode == code, (verb, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, (verb, result.stderr)
        messages[verb] = error_text(result.stderr, verb)
        for phrase in phrases:
            assert phrase in messages[verb], (verb, messages[verb])
        assert "fix:" in messages[verb]
        out = tmp_path / "out"
        assert not out.exists() or [p for p in out.rglob("*")] == [], (verb, list(out.rglob("*")))
    assert messages["validate"] == messages["finetune"]


def test_a_directory_and_a_glob_of_jsonl_validate_and_train_as_one_dataset(tmp_path: Path) -> None:
    source = (REPO / "src" / "llmtrain" / "embedded" / "arith.jsonl").read_text().splitlines()
    put(tmp_path, "dd/b.jsonl", "\n".join(source[:60]) + "\n")
    put(tmp_path, "dd/a.jsonl", "\n".join(source[60:100]) + "\n")
    put(tmp_path, "dd/README.md", "not data\n")
    listed = "2 jsonl files, read in this order: a.jsonl (40 rows), b.jsonl (60 rows)"
    for path in (tmp_path / "dd", tmp_path / "dd" / "*.jsonl"):
        cfg = config(tmp_path, path=str(path))
        result = run_cli("validate", cfg, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert listed in result.stderr and "data (all rows): 100/100 rows kept" in result.stdout
    result = run_cli("finetune", cfg, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert listed in result.stderr
    info = json.loads((tmp_path / "out" / "prepared" / "prepared.json").read_text())
    assert info["stats"]["rows"] == 100
    assert (tmp_path / "out" / "final" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "text"])
def test_validate_and_prepare_leave_no_datasets_cache_in_home(tmp_path: Path, fmt: str) -> None:
    import datasets

    home = tmp_path / "home"
    home.mkdir()
    questions = [{"question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(8)]
    if fmt == "text":
        path = put(tmp_path, "d.txt", "\n\n".join(f"{q['question']} {q['answer']}"
                                                  for q in questions) + "\n")
        cfg = config(tmp_path, path=path, shape="text")
    else:
        path = str(tmp_path / f"d.{fmt}")
        rows_ds = datasets.Dataset.from_list(questions)
        rows_ds.to_csv(path) if fmt == "csv" else rows_ds.to_parquet(path)
        cfg = config(tmp_path, path=path)
    # HF_HOME where the datasets library puts it by default, so nothing else redirects it.
    env = {"HOME": str(home), "HF_HOME": str(home / ".cache" / "huggingface"),
           "HF_DATASETS_CACHE": str(home / ".cache" / "huggingface" / "datasets")}
    for verb in ("validate", "prepare"):
        result = run_cli(verb, cfg, cwd=tmp_path, env=env)
        assert result.returncode == 0, (verb, result.stderr[-3000:])
        cached = [p for p in home.rglob("*") if p.is_file() and "datasets" in p.parts]
        assert cached == [], (verb, cached)
    assert (tmp_path / "out" / "prepared" / "prepared.json").is_file()
