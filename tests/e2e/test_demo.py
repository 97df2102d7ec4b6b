"""The demo (make smoke: configs/demo.yaml on the embedded tiny Llama) learns visibly: the base
model answers no held-out question, the LoRA-trained one answers at least 80% of them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from llmtrain.config import resolve_path
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_answers_held_out_questions_after_training(tmp_path: Path) -> None:
    result = run_cli("finetune", "configs/demo.yaml", f"output.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "samples.json").read_text())
    assert summary["held_out"] and summary["rows"] == len(summary["samples"]) == 16
    # Held out means never trained on: no asked question is in a training row's text.
    asked = [s["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:")
             for s in summary["samples"]]
    train = load_from_disk(str(next((tmp_path / "prepared").rglob("train"))))
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("embedded:tiny-llama"))
    texts = tokenizer.batch_decode(list(train["input_ids"]))  # datasets 4.x: a lazy Column
    assert len(texts) == 155 - 16 and all(t.count("What is ") == 1 for t in texts)
    assert len(set(asked)) == 16 and not [q for q in asked if any(q in t for t in texts)]
    assert summary["exact_match_before_fraction"] <= 0.2, summary
    assert summary["exact_match_after_fraction"] >= 0.8, summary
    assert "exact match on 16 held-out rows: before training" in result.stderr
    records = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert [r["before"] for r in records] == [s["before"] for s in summary["samples"]]
