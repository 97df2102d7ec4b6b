"""DPO and ORPO end to end on CPU through the real CLI, on the embedded tiny Llama and pairs
of sums the test writes (chosen: the right sum; rejected: a wrong one, the difference): the
held-out reward margin and preference accuracy rise, the metrics reach metrics.jsonl and
TensorBoard, a stopped and resumed run has the losses of an uninterrupted one, the merged model
has the adapter's logits, generate answers with both, and ORPO's loss falls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli
from tests.e2e.test_lora_variants import BASE, probe

pytestmark = pytest.mark.slow
SETTINGS = [
    "data.eval_fraction=0.25", "training.learning_rate=3e-3", "training.report_to=[none]",
    "training.save_steps=100", "output.merge=false",
]
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def write_pairs(path: Path) -> Path:
    """The addition questions of arith.jsonl as pairs: the sum against the difference."""
    rows = []
    for line in (REPO / "src" / "llmtrain" / "embedded" / "arith.jsonl").read_text().splitlines():
        row = json.loads(line)
        a, b = row["meta"]["a"], row["meta"]["b"]
        if row["meta"]["op"] != "plus":
            continue
        wrong = abs(a - b) if abs(a - b) != a + b else a + b + 1
        rows.append({"prompt": row["question"], "chosen": str(a + b), "rejected": str(wrong)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data") / "sums.jsonl")


@pytest.fixture(scope="module")
def dpo_run(pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dpo")
    result = run_cli(
        "finetune", "configs/dpo.yaml", f"data.path={pairs}", f"output.dir={out}", *SETTINGS,
        "training.num_train_epochs=3", "training.eval_steps=10", "training.logging_steps=5",
        "training.report_to=[tensorboard]", "output.merge=true",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_dpo_raises_the_held_out_reward_margin_and_accuracy(dpo_run: Path) -> None:
    evals = [r for r in records(dpo_run) if "eval_loss" in r]
    assert len(evals) >= 3
    # Before the first step the policy is the reference: every margin is 0 and no pair is
    # preferred (accuracy 0); the loss is log 2.
    first = next(r for r in records(dpo_run) if "loss_exact" in r)
    assert abs(first["loss_exact"][0] - 0.693147) < 1e-5
    last = evals[-1]
    assert last["eval_rewards/margins"] > 0.1, evals
    assert last["eval_rewards/accuracies"] >= 0.7, evals
    assert last["eval_rewards/margins"] > evals[0]["eval_rewards/margins"]
    assert last["eval_loss"] < 0.693147  # below the reference's loss on held-out pairs
    train = [r for r in records(dpo_run) if "loss" in r]
    assert all(all(k in r for k in REWARDS) for r in train)
    for r in train:
        margin = r["rewards/chosen"] - r["rewards/rejected"]
        assert abs(r["rewards/margins"] - margin) < 1e-5


def test_reward_metrics_reach_tensorboard(dpo_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (dpo_run / "tensorboard").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in REWARDS:
        assert f"train/{key}" in tags and f"eval/{key}" in tags, sorted(tags)


def test_merged_dpo_model_has_the_adapter_logits_and_generate_uses_both(
    dpo_run: Path, pairs: Path, tmp_path: Path
) -> None:
    final = dpo_run / "final"
    with_adapter = probe(BASE, final / "adapter")
    assert torch.allclose(with_adapter, probe(final / "merged"), atol=1e-4)
    assert (with_adapter - probe(BASE)).abs().max() > 1e-2
    answers = []
    for source in (["--adapter", str(final / "adapter")], ["--model", str(final / "merged")]):
        out = tmp_path / f"{source[0].strip('-')}.jsonl"
        result = run_cli("generate", "configs/dpo.yaml", f"data.path={pairs}",
                         f"output.dir={dpo_run}", "generation.max_new_tokens=4", "--limit", "4",
                         *source, "--out", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
        answers.append([json.loads(x)["output"] for x in out.read_text().splitlines()])
        assert "held-out rows" in result.stderr  # the run's held-out pairs' prompts
    assert answers[0] == answers[1] and len(answers[0]) == 4


def start(out: Path, pairs: Path, extra: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "llmtrain.cli", "finetune", "configs/dpo.yaml",
         f"data.path={pairs}", f"output.dir={out}", *SETTINGS, *extra],
        cwd=REPO, env={**os.environ}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("weights", ["lora", "full"])
def test_stopped_and_resumed_dpo_has_the_uninterrupted_losses(
    pairs: Path, tmp_path: Path, weights: str
) -> None:
    """LoRA (reference: the adapter disabled) and full weights (a frozen reference copy)."""
    extra = ["training.max_steps=12", "training.save_steps=3", "training.logging_steps=1",
             "data.eval_fraction=0", f"preference.weights={weights}"]
    ref = tmp_path / "ref"
    proc = start(ref, pairs, extra)
    assert proc.wait() == 0, proc.communicate()[0][-3000:]
    out = tmp_path / "run"
    proc = start(out, pairs, extra)
    deadline = time.monotonic() + 300
    while not any(r.get("step", 0) >= 4 and "loss_exact" in r for r in records(out)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 75, proc.communicate()[0][-3000:]
    stopped = [r["step"] for r in records(out) if "loss_exact" in r]
    assert max(stopped) < 12
    proc = start(out, pairs, extra)
    assert proc.wait() == 0, proc.communicate()[0][-3000:]

    def per_step(run: Path) -> dict[int, dict]:
        return {r["step"]: r for r in records(run) if "loss_exact" in r}

    reference, resumed = per_step(ref), per_step(out)
    assert sorted(resumed) == sorted(reference) == list(range(1, 13))
    for step, r in reference.items():
        assert abs(resumed[step]["loss_exact"][0] - r["loss_exact"][0]) <= 1e-6, step
        assert abs(resumed[step]["rewards/margins"] - r["rewards/margins"]) <= 1e-5, step
    name = "adapter/adapter_model.safetensors" if weights == "lora" else "model/model.safetensors"
    a, b = (load_file(run / "final" / name) for run in (ref, out))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k


def test_orpo_trains_without_a_reference(pairs: Path, tmp_path: Path) -> None:
    config = tmp_path / "orpo.yaml"
    config.write_text((REPO / "configs" / "orpo.yaml").read_text())
    result = run_cli(
        "finetune", str(config), f"data.path={pairs}", f"output.dir={tmp_path / 'out'}",
        *SETTINGS, "training.num_train_epochs=4", "training.logging_steps=2",
        "data.eval_fraction=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [r for r in records(tmp_path / "out") if "loss" in r]
    losses = [x for r in logged for x in r["loss_exact"]]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert all("nll_loss" in r and "rewards/accuracies" in r for r in logged)
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]


@pytest.mark.parametrize("verb", ["validate", "finetune"])
def test_bad_pairs_and_settings_exit_before_anything_is_written(tmp_path: Path, verb: str) -> None:
    good = {"prompt": "What is 1 plus 1?", "chosen": "2", "rejected": "3"}
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [good, good, {**good, "rejected": "2"}]))
    out = tmp_path / "out"
    result = run_cli(verb, "configs/dpo.yaml", f"data.path={data}", f"output.dir={out}",
                     "data.eval_fraction=0")
    assert result.returncode == 65, result.stderr[-2000:]
    assert "pairs.jsonl line 3: chosen and rejected are the same text" in result.stderr
    result = run_cli(verb, "configs/dpo.yaml", f"output.dir={out}", "data.packing=padding_free")
    assert result.returncode == 64, result.stderr[-2000:]
    assert "not supported for method dpo" in result.stderr
    assert not out.exists()
