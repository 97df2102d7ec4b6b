"""End to end on CPU through the real CLI: every method on the embedded tiny Llama."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain import stack
from llmtrain.train import checkpoints
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def locked(package: str) -> str:
    """The version the installed stack's lock file pins for `package`."""
    lock = REPO / "requirements" / ("lock-current.txt" if stack.is_current() else "lock.txt")
    found = re.search(rf"^{package}==(\S+)", lock.read_text(), re.MULTILINE)
    assert found, f"{package} is not in {lock.name}"
    return found.group(1)


def losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    outs = {}
    for method, extra in {
        "lora": ["training.num_train_epochs=6", "generation.samples=6"],
        "full": ["training.num_train_epochs=4"],
        "layers": ["training.num_train_epochs=4"],
    }.items():
        out = base / method
        config = "demo" if method == "lora" else method  # the demo is the LoRA config
        result = run_cli("finetune", f"configs/{config}.yaml", f"output.dir={out}",
                         "training.logging_steps=2", "training.save_steps=10", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        # Beside the run, not in it: what a batch log (captured, so no TTY) would hold.
        (base / f"{method}.stderr").write_text(result.stderr)
        (base / f"{method}.stdout").write_text(result.stdout)
        outs[method] = out
    return outs


@pytest.mark.parametrize("method", ["lora", "full", "layers"])
def test_loss_falls_by_half_and_artifacts_exist(runs: dict[str, Path], method: str) -> None:
    out = runs[method]
    values = losses(out)
    assert len(values) >= 3
    assert values[-1] < 0.5 * values[0], values
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "prepared/prepared.json"):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["seed"] == 42
    # the locked release of the stack this runs on (pinned: lock.txt; current: lock-current.txt)
    assert manifest["packages"]["transformers"] == locked("transformers")
    # the run's plan, each decision with its reason (CPU: fp32, one process)
    decided = manifest["plan"]
    assert decided["strategy"] == {"value": "single", "reason": "auto: one process"}
    assert manifest["strategy"] == "single"
    assert decided["precision"] == {"value": "fp32", "reason": "auto: no CUDA GPU"}
    assert decided["adapter"]["value"] is (method == "lora")
    assert decided["fused_lora"]["value"] is (method == "lora")
    assert all(d["reason"] for d in decided.values())
    final = out / "final" / ("adapter" if method == "lora" else "model")
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    assert (final / weights).is_file() and (final / "tokenizer_config.json").is_file()
    # BPE merges as "a b" strings on either stack: the pinned stack's tokenizers 0.15 reads the
    # outputs of the current stack too (support.write_portable_tokenizer)
    merges = json.loads((final / "tokenizer.json").read_text())["model"]["merges"]
    assert merges and all(isinstance(m, str) for m in merges)
    complete = sorted(out.glob("checkpoint-*/llmtrain-complete.json"))
    assert complete and (out / "latest").read_text().strip() == complete[-1].parent.name


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "full", "layers"])
def test_held_out_data_is_evaluated_without_eval_steps(runs: dict[str, Path], method: str) -> None:
    """The shipped configs hold out 10% and set no eval_steps: eval at every save and the end."""
    out = runs[method]
    steps = [r["step"] for r in records(out) if "eval_loss" in r]
    last = max(r["step"] for r in records(out))
    assert steps == [*range(10, last, 10), last] or steps == list(range(10, last + 1, 10)), steps
    assert all(r["eval_loss"] > 0 for r in records(out) if "eval_loss" in r)


PROGRESS = re.compile(
    r"^\[llmtrain\] step (\d+)/(\d+) \(\d+%\), loss ([\d.]+), lr \S+, [\d,]+ tokens/s, "
    r"eta \d+:\d\d:\d\d$",
    re.MULTILINE,
)


@pytest.mark.parametrize("method", ["lora", "full", "layers"])
def test_batch_log_has_progress_lines_and_a_summary(runs: dict[str, Path], method: str) -> None:
    out = runs[method]
    stderr = (out.parent / f"{method}.stderr").read_text()
    stdout = (out.parent / f"{method}.stdout").read_text()
    progress = [(int(m[1]), int(m[2]), float(m[3])) for m in PROGRESS.finditer(stderr)]
    total = progress[0][1]
    assert [p[0] for p in progress] == list(range(2, total + 1, 2))  # training.logging_steps=2
    assert [p[2] for p in progress] == pytest.approx(losses(out), abs=1e-4)
    assert "{'loss'" not in stdout  # HF's raw log dicts are replaced by the lines
    evals = [r for r in records(out) if "eval_loss" in r]
    assert f"[llmtrain] step {total}/{total}: eval loss {evals[-1]['eval_loss']:.4f}" in stderr

    summary = stderr[stderr.index("[llmtrain] run summary\n"):].splitlines()
    assert re.fullmatch(rf"  method: {method}, [\d,]+ of [\d,]+ parameters trained \(.*%\)",
                        summary[1])
    assert re.fullmatch(r"  data: (\d+)/\1 rows kept \(.*\); \d+ tokens, \d+ with loss",
                        summary[2])
    values = losses(out)
    assert summary[3] == f"  loss: {values[0]:.4f} -> {values[-1]:.4f} ({len(values)} log steps)"
    assert summary[4].startswith(
        f"  eval loss: {evals[0]['eval_loss']:.4f} -> {evals[-1]['eval_loss']:.4f} "
        f"at step {total} "
    )
    assert re.fullmatch(rf"  time: \d+:\d\d:\d\d for {total} steps, [\d,]+ tokens/s", summary[5])
    assert summary[6] == "  outputs:"
    final = out / "final" / ("adapter" if method == "lora" else "model")
    listed = dict(line.strip().split(": ", 1) for line in summary[7:] if line.startswith("    "))
    assert listed[f"final {final.name} (the last step's)"] == str(final)
    best = out / checkpoints.BEST  # names the lowest eval loss's checkpoint when evals ran
    assert listed.get("best checkpoint (lowest eval loss)") == (
        str(out / best.read_text().strip()) if best.is_file() else None
    )
    assert listed["metrics"] == str(out / "metrics.jsonl")
    assert listed["tensorboard"] == str(out / "tensorboard")
    if method == "lora":  # configs/lora.yaml merges and answers held-out questions
        assert listed["merged model"] == str(out / "final" / "merged")
        assert listed["generations"] == str(out / "generations.jsonl")
    assert all(Path(p).exists() for p in listed.values())


def test_generations_file_format(runs: dict[str, Path]) -> None:
    records = [json.loads(x) for x in (runs["lora"] / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 6
    for r in records:
        assert r["prompt"].startswith("Question: What is ") and r["prompt"].endswith("Answer:")
        assert isinstance(r["output"], str) and r["output"]
        assert isinstance(r["before"], str)  # the base model's answer to the same prompt
        assert r["params"] == {"max_new_tokens": 4, "do_sample": False}
        assert r["reference"].strip().isdigit()


PROBE = """
import json, sys, torch
from pathlib import Path
from llmtrain.config import ModelSection
from llmtrain.model.export import load_for_inference
kind, path = sys.argv[1], Path(sys.argv[2])
base = ModelSection(path="embedded:tiny-llama", dtype="float32")
if kind == "adapter":
    model, tok = load_for_inference(base, path)
else:
    model, tok = load_for_inference(base.model_copy(update={"path": str(path)}), None)
batch = tok(["Question: What is 3 plus 4?\\nAnswer:", "Question: What is 9 minus 2?\\nAnswer:"],
            return_tensors="pt", padding=True)
with torch.no_grad():
    print(json.dumps(model(**batch).logits.tolist()))
"""


def probe_logits(kind: str, path: Path) -> list:
    result = subprocess.run([sys.executable, "-c", PROBE, kind, str(path)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_merged_model_logits_equal_adapter_logits(runs: dict[str, Path]) -> None:
    import torch

    adapter = torch.tensor(probe_logits("adapter", runs["lora"] / "final" / "adapter"))
    merged = torch.tensor(probe_logits("model", runs["lora"] / "final" / "merged"))
    assert torch.allclose(adapter, merged, atol=1e-4), (adapter - merged).abs().max()
    base = torch.tensor(probe_logits("model", Path("src/llmtrain/embedded/tiny-llama")))
    assert (adapter - base).abs().max() > 1e-2  # the adapter changed the model


def test_generate_verb_with_adapter_and_prompts_file(runs: dict[str, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Question: What is 1 plus 1?\\nAnswer:"}\n')
    out = tmp_path / "answers.jsonl"
    result = run_cli("generate", "configs/demo.yaml", "--adapter",
                     str(runs["lora"] / "final" / "adapter"), "--prompts", str(prompts),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert record["prompt"] == "Question: What is 1 plus 1?\nAnswer:" and "output" in record
    # a newcomer's bare question was answered as a whole prompt without a word about it
    assert "each the whole text the model reads (data.prompt_template" in result.stderr
