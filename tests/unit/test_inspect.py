"""`llmtrain inspect` shows which tokens are trained, as plain text (no TTY needed).
Tokenizer: the embedded Llama-2-style SentencePiece."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from llmtrain.config import ModelSection
from llmtrain.model.load import load_tokenizer
from llmtrain.verbs.inspect import runs
from tests.conftest import run_cli


def test_runs_split_trained_and_masked_positions() -> None:
    assert runs([-100, -100, 5, 6, -100, 7]) == [(0, 2, False), (2, 4, True), (4, 5, False),
                                                  (5, 6, True)]
    assert runs([3]) == [(0, 1, True)]


def test_inspect_prints_masked_and_trained_spans_with_bos_and_eos(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"q": "What is 7 plus 4?", "a": "11"}) + "\n"
        + json.dumps({"q": "What is 2 minus 2?", "a": None}) + "\n"
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": "embedded:tiny-llama"},
        "data": {"path": str(data), "prompt_template": "Question: {q}\nAnswer:",
                 "response_template": " {a}"},
        "method": {"name": "lora"},
        "output": {"dir": str(tmp_path / "out")},
    }))
    result = run_cli("inspect", str(config), "--rows", "2", "--pieces")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "special tokens: BOS '<s>', EOS '</s>', padding '<unk>'"
    assert "1/2 rows kept" in lines[1] and "1 dropped with an empty response" in lines[1]
    tok = load_tokenizer(ModelSection(path="embedded:tiny-llama"))
    n = len(tok("Question: What is 7 plus 4?\nAnswer: 11", add_special_tokens=False).input_ids)
    row = lines.index(f"row 0: {n + 2} tokens, 4 trained")  # with BOS and EOS
    assert lines[row + 1] == (
        "[masked]<s> Question: What is 7 plus 4?\\nAnswer:[/masked][trained] 11</s>[/trained]"
    )
    assert lines[row + 2].startswith("<s> ▁Question ")
    assert lines[row + 2].endswith(" : *▁* *1* *1* *</s>*")
    assert not (tmp_path / "out").exists()
