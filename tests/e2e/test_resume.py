"""Preemption: a run interrupted three times (signal, stop file, kill -9 during a checkpoint
write) and resumed each time gives the per-step losses and final weights of a run that was
never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO

pytestmark = pytest.mark.slow
STEPS = 24
ARGS = [
    "configs/demo.yaml", f"training.max_steps={STEPS}", "training.save_steps=4",
    "training.logging_steps=1", "generation.samples=0", "output.merge=false",
    "training.report_to=[none]",
]


def start(out: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "llmtrain.cli", "finetune", *ARGS, f"output.dir={out}"],
        cwd=REPO, env={**os.environ, **(env or {})}, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def logged_steps(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss_exact" in r]


def wait_for_step(proc: subprocess.Popen[str], out: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while not any(r["step"] >= step for r in logged_steps(out)):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def per_step_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss_exact"][0] for r in logged_steps(out)}


def kill_during_checkpoint_write(proc: subprocess.Popen[str], out: Path) -> str:
    """SIGKILL as soon as a checkpoint directory appears without its completion marker."""
    seen = {p.name for p in out.glob("checkpoint-*")}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for ckpt in out.glob("checkpoint-*"):
            if ckpt.name not in seen and not (ckpt / "llmtrain-complete.json").exists():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                if not (ckpt / "llmtrain-complete.json").exists():
                    return ckpt.name
                raise AssertionError("marker appeared before the kill landed")
            seen.add(ckpt.name)
        assert proc.poll() is None, "run ended before a checkpoint write could be interrupted"
        time.sleep(0.002)
    raise AssertionError("no checkpoint write was seen")


def test_interrupted_three_times_equals_uninterrupted(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    proc = start(ref)
    assert proc.wait() == 0, proc.communicate()[0][-3000:]
    reference = per_step_losses(ref)
    assert sorted(reference) == list(range(1, STEPS + 1))

    out = tmp_path / "run"
    stop_file = tmp_path / "STOP"
    env = {"LLMTRAIN_STOP_FILE": str(stop_file)}

    proc = start(out, env)  # 1: SIGUSR1, as the wall-time warning would send
    wait_for_step(proc, out, 5)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 75
    stopped_at = json.loads((out / "latest").read_text().strip() and
                            (out / (out / "latest").read_text().strip() /
                             "llmtrain-complete.json").read_text())["step"]
    assert 5 <= stopped_at < STEPS

    proc = start(out, env)  # 2: the stop file the launcher writes
    wait_for_step(proc, out, stopped_at + 3)
    stop_file.write_text("stop\n")
    assert proc.wait(timeout=300) == 75
    stop_file.unlink()

    proc = start(out, env)  # 3: kill -9 in the middle of writing a checkpoint
    partial = kill_during_checkpoint_write(proc, out)
    assert not (out / partial / "llmtrain-complete.json").exists()

    proc = start(out, env)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert f"checkpoint {out / partial}" not in output or "incomplete" in output

    resumed = per_step_losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # no step skipped or logged twice
    for step in reference:
        assert abs(resumed[step] - reference[step]) <= 1e-6, (step, resumed[step], reference[step])
    a = load_file(ref / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k


def test_half_written_newest_checkpoint_resumes_from_the_one_before(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start(out, {})
    assert proc.wait() == 0
    newest = out / (out / "latest").read_text().strip()
    # Plant a newer checkpoint that never finished: weights cut short, no marker.
    partial = out / f"checkpoint-{STEPS + 4}"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    from llmtrain.train.checkpoints import latest_complete

    assert latest_complete(out) == newest


def test_token_budget_keeps_the_losses_and_resumes_exactly(tmp_path: Path) -> None:
    """Padding-free packing with token-budget micro-batches: the per-step losses of a run
    without a budget, a budget that cuts each step into several micro-batches, and that run
    stopped and resumed are the same (the budget changes speed, not the objective)."""
    budget_args = ["data.packing=padding_free", "training.per_device_train_batch_size=8",
                   f"training.max_steps={STEPS // 4}", "training.save_steps=2"]

    def run(out: Path, extra: list[str], env: dict[str, str] | None = None) -> (
        subprocess.Popen[str]
    ):
        return subprocess.Popen(
            [sys.executable, "-m", "llmtrain.cli", "finetune", *ARGS, *budget_args, *extra,
             f"output.dir={out}"],
            cwd=REPO, env={**os.environ, **(env or {})}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )

    plain = run(tmp_path / "plain", [])
    assert plain.wait() == 0, plain.communicate()[0][-3000:]
    reference = per_step_losses(tmp_path / "plain")
    assert sorted(reference) == list(range(1, STEPS // 4 + 1))

    budget = ["training.tokens_per_batch=64"]  # 8 samples of 21-22 tokens: 2-3 per chunk
    whole = run(tmp_path / "budget", budget)
    output = whole.communicate()[0]
    assert whole.returncode == 0, output[-3000:]
    assert "8 samples per optimizer step in 4 micro-batch(es) of at most 64 tokens" in output
    budgeted = per_step_losses(tmp_path / "budget")
    assert sorted(budgeted) == sorted(reference)
    for step in reference:
        assert budgeted[step] == pytest.approx(reference[step], rel=1e-5), step

    out, stop_file = tmp_path / "resumed", tmp_path / "STOP"
    env = {"LLMTRAIN_STOP_FILE": str(stop_file)}
    proc = run(out, budget, env)
    wait_for_step(proc, out, 2)
    stop_file.write_text("stop\n")
    assert proc.wait(timeout=300) == 75
    stop_file.unlink()
    proc = run(out, budget, env)
    assert proc.wait(timeout=300) == 0, proc.communicate()[0][-3000:]
    resumed = per_step_losses(out)
    assert sorted(resumed) == sorted(budgeted)
    for step in budgeted:
        assert abs(resumed[step] - budgeted[step]) <= 1e-6, (step, resumed[step], budgeted[step])
