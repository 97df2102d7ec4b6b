"""Chat fine-tuning end to end on CPU through the real CLI: the embedded tiny Llama with the
built-in llama-2 template (it has no template of its own), multi-turn conversations with system
prompts, packed without padding."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llmtrain.data.chat import TEMPLATES
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        msgs = [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": str(a + b)},
            {"role": "user", "content": f"And {a + b} minus {b}?"},
            {"role": "assistant", "content": str(a)},
        ]
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_args(data: Path, out: Path) -> list[str]:
    return [
        "configs/chat.yaml", "model.path=embedded:tiny-llama", f"data.path={data}",
        "data.chat_template=llama-2", "data.max_length=128", "data.eval_fraction=0.1",
        f"output.dir={out}", "training.per_device_train_batch_size=8",
        "training.gradient_accumulation_steps=1", "training.learning_rate=3e-3",
        "training.max_steps=40", "training.save_steps=40", "training.eval_steps=20",
        "training.logging_steps=5", "generation.samples=4", "generation.max_new_tokens=6",
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("chat")
    data = write_jsonl(base / "chat.jsonl", conversations(120))
    out = base / "out"
    result = run_cli("finetune", *chat_args(data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_chat_run_learns_and_saves_its_template_and_stop_token(run: Path) -> None:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert any("eval_loss" in r for r in records)
    assert (run / "best").read_text() == "checkpoint-40\n"  # evaluated at 20 and 40, saved at 40
    marker = json.loads((run / "checkpoint-40" / "llmtrain-complete.json").read_text())
    assert marker["eval_loss"] == [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    adapter = run / "final" / "adapter"
    # transformers 4.37.2 keeps the template in tokenizer_config.json; 5.x in chat_template.jinja
    tok_cfg = json.loads((adapter / "tokenizer_config.json").read_text())
    jinja = adapter / "chat_template.jinja"
    saved = jinja.read_text() if jinja.is_file() else tok_cfg["chat_template"]
    assert saved == TEMPLATES["llama-2"]
    assert json.loads((adapter / "generation_config.json").read_text())["eos_token_id"] == 2


def test_samples_answer_held_out_conversations_through_the_template(run: Path) -> None:
    records = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for r in records:
        assert r["prompt"].startswith("<s>[INST] <<SYS>>\nYou add numbers.\n<</SYS>>")
        assert r["prompt"].endswith("[/INST]")
        assert r["messages"][-1] == {"role": "assistant", "content": r["output"]}
        assert r["messages"][-2]["role"] == "user" and r["reference"].isdigit()


def test_generate_renders_prompt_files_with_the_saved_template(run: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 2 plus 2?\n")
    out = tmp_path / "answers.jsonl"
    result = run_cli("generate", "configs/chat.yaml", "model.path=embedded:tiny-llama",
                     "data.system_prompt=You add numbers.", "generation.max_new_tokens=6",
                     "--adapter", str(run / "final" / "adapter"), "--prompts", str(prompts),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text().splitlines()[0])
    assert record["prompt"] == (
        "<s>[INST] <<SYS>>\nYou add numbers.\n<</SYS>>\n\nWhat is 2 plus 2? [/INST]"
    )
    assert record["messages"][0] == {"role": "system", "content": "You add numbers."}


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
         "line 21: turn 1 has no role"),
        ({"messages": [{"role": "wizard", "content": "hi"}]},
         "line 21: turn 1 has the unknown role"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "line 21: no assistant turn"),
        ({"messages": []}, "line 21: the conversation is empty"),
    ],
)
def test_bad_conversations_exit_65_from_validate_and_finetune(
    tmp_path: Path, row: dict, problem: str
) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", [*conversations(20), row])
    out = tmp_path / "out"
    for verb in ("validate", "finetune"):
        result = run_cli(verb, *chat_args(data, out))
        assert result.returncode == 65, (verb, result.stderr[-2000:])
        assert f"chat.jsonl {problem}" in result.stderr, (verb, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert not out.exists()


def test_two_sources_mixed_with_counts_per_source(tmp_path: Path) -> None:
    import yaml

    chats = write_jsonl(tmp_path / "chat.jsonl", conversations(40))
    out = tmp_path / "out"
    config = tmp_path / "mixed.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"path": "embedded:tiny-llama"},
        "data": {
            "chat_template": "llama-2", "max_length": 128, "eval_fraction": 0.1,
            "sources": [
                {"path": "embedded:arith.jsonl", "shape": "instruction", "rows": 60,
                 "prompt_template": "Question: {question}\nAnswer:",
                 "response_template": " {answer}"},
                {"path": str(chats), "shape": "chat", "weight": 2.0},
            ],
        },
        "method": {"name": "lora"},
        "training": {"per_device_train_batch_size": 8, "learning_rate": 3e-3, "max_steps": 12,
                     "save_steps": 12, "logging_steps": 4, "report_to": ["none"]},
        "generation": {"samples": 4, "max_new_tokens": 4},
        "output": {"dir": str(out)},
    }))
    checked = run_cli("validate", str(config))
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert "data.sources[0] (all rows): 155/155 rows kept" in checked.stdout
    assert "data.sources[1] (all rows): 40/40 rows kept" in checked.stdout
    result = run_cli("finetune", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "prepared" / "prepared.json").read_text())
    # 155 rows -> 16 held out (datasets rounds up), 60 of the other 139 trained; 40
    # conversations are 30 distinct ones (random sums repeat), every copy on its first copy's
    # side: 3 distinct held out (one copy each here), the other 37 rows x 2 trained
    assert [s["train"]["kept"] for s in info["sources"]] == [60, 74]
    assert [s["eval"]["kept"] for s in info["sources"]] == [16, 3]
    assert info["stats"]["kept"] == 134
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in r for r in records)
    samples = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and samples[0]["prompt"].startswith("Question: ")
