"""The benchmark's bookkeeping: the same samples counted alike padded or packed, refusal of runs
that saw other data or batches, the stated length distribution, and a CPU smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from bench.probe import RunResult, batch_stats
from bench.report import NotComparable, check_comparable, metrics
from bench.workloads import CAP, MEDIAN, WORKLOADS, build_rows, sample_lengths

from llmtrain.data.collate import PadCollator
from llmtrain.kernels.varlen_attention import PackingCollator
from llmtrain.labels import IGNORE_INDEX


def features() -> list[dict[str, list[int]]]:
    out = []
    for n, prompt in ((5, 2), (9, 4), (3, 1)):
        ids = list(range(10 + n, 10 + 2 * n))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows padded on the left, as a Llama tokenizer does by default."""
    out = {k: v.clone() for k, v in batch.items()}
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        for k in out:
            out[k][i] = batch[k][i].roll(batch[k].shape[1] - n)
    return out


def test_padded_and_packed_batches_count_the_same_samples() -> None:
    padded = PadCollator(pad_token_id=0)(features())
    packed = PackingCollator()(features())
    p, lp, q = batch_stats(padded), batch_stats(left_padded(padded)), batch_stats(packed)
    tokens, real, loss, samples, sum_sq, checksum = p.tolist()
    assert tokens == 3 * 16 and real == 17 and samples == 3
    assert loss == 3 + 5 + 2  # response tokens
    assert sum_sq == 25 + 81 + 9
    assert q.tolist() == [17, 17, loss, 3, sum_sq, checksum]
    assert lp.tolist() == p.tolist()


def result(**kw: object) -> RunResult:
    base = RunResult(
        "x", seconds=2.0, timed_steps=2, tokens=200, real_tokens=100, loss_tokens=50,
        samples=8, sum_sq_lengths=1000, samples_per_step=[4, 4, 4], checksums=[1, 2, 3],
        losses=[2.0, 1.9, 1.8],
    )  # fmt: skip
    return replace(base, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"checksums": [1, 2, 4]},
        {"samples_per_step": [8, 8, 8]},
        {"timed_steps": 3},
        {"loss_tokens": 49},
    ],
    ids=["other-data", "other-batch", "other-steps", "other-labels"],
)
def test_refuses_runs_with_other_data_or_batch(change: dict[str, object]) -> None:
    check_comparable(result(), result(name="y", seconds=1.0))
    with pytest.raises(NotComparable):
        check_comparable(result(), result(name="y", **change))


def test_mfu_formula() -> None:
    """TinyLlama at the issue's 47.6k tokens/s of fixed 2048 rows reads about 34%."""
    shape = {"parameters": 1_100_048_384, "layers": 22, "hidden": 2048}
    tokens = 47_600
    r = result(tokens=tokens, real_tokens=tokens, seconds=1.0, sum_sq_lengths=tokens * 2048)
    assert metrics(r, shape)["mfu"] == pytest.approx(0.344, abs=0.001)


def test_length_distribution_is_as_stated() -> None:
    lengths = torch.tensor(sample_lengths(20_000, MEDIAN, CAP, seed=1), dtype=torch.float)
    assert lengths.median().item() == pytest.approx(MEDIAN, rel=0.03)
    assert lengths.max().item() <= CAP and lengths.min().item() >= 16
    rows = build_rows(WORKLOADS["var-1b-full"], 50, seed=0)
    for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True):
        prompt = sum(1 for t in labels if t == IGNORE_INDEX)
        assert 0.2 * len(ids) - 1 <= prompt <= 0.7 * len(ids)
        assert labels[prompt:] == ids[prompt:]


@pytest.mark.slow
def test_smoke_run_compares_padding_free_with_the_baseline(tmp_path: Path, repo: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--workloads", "var-tiny-full",
         "--variants", "llmtrain", "--out", str(tmp_path)],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    base, ours = report["runs"]
    assert base["padding_share"] > 0.2 and ours["padding_share"] == 0
    assert ours["first_loss_rel_diff"] < 1e-5
    assert "sdpa_per_sample" in ours["raw"]["notes"]["attention"]
    assert (tmp_path / "results.md").read_text().startswith("| workload | run |")


@pytest.mark.slow
def test_smoke_run_with_a_token_budget_holds_the_baseline_steps(tmp_path: Path, repo: Path) -> None:
    """--accumulation 2 --tokens-per-batch 64: 8 samples per step on both sides, llmtrain's cut
    into several packed micro-batches of at most 64 tokens; the steps hold the same samples
    (else the run is refused, exit 1) and the losses agree."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--workloads", "var-tiny-full",
         "--variants", "llmtrain", "--accumulation", "2", "--tokens-per-batch", "64",
         "--out", str(tmp_path)],
        cwd=repo, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 samples per optimizer step in 4 micro-batch(es) of at most 64 tokens" in proc.stderr
    report = json.loads((tmp_path / "results.json").read_text())
    base, plain, budget = report["runs"]
    assert budget["run"] == "llmtrain+budget" and "error" not in budget
    assert budget["raw"]["samples_per_step"] == base["raw"]["samples_per_step"] == [8, 8, 8]
    assert budget["raw"]["checksums"] == plain["raw"]["checksums"] == base["raw"]["checksums"]
    assert budget["max_loss_rel_diff"] < 1e-5 and plain["max_loss_rel_diff"] < 1e-5
    assert budget["predicted_peak_gib"] > 0
    assert "| llmtrain+budget |" in (tmp_path / "results.md").read_text()


def test_memory_report_predicts_measured_rows_again(tmp_path: Path, repo: Path) -> None:
    """`python -m bench.memory_validation --report` re-predicts stored measurements on a CPU: the
    error column follows the current estimator, not the one of the run."""
    stored = tmp_path / "measured.json"
    row = {
        "run": "lora-7b-ddp", "model": "7b", "method": "lora", "strategy": "ddp", "gpus": 1,
        "micro_batch": 4, "seq_len": 1024, "checkpointing": False, "exit": 0, "oom": False,
        "attention": "sdpa", "measured_gib": 40.0, "predicted_allocated_gib": 1.0,
    }  # fmt: skip
    stored.write_text(json.dumps([row]))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory_validation", "--report", str(stored),
         "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (got,) = json.loads((out / "memory_validation.json").read_text())
    assert 30 < got["predicted_allocated_gib"] < 60  # 7B bf16 weights alone are 12.6 GiB
    assert got["error_pct"] == pytest.approx(100 * (got["predicted_allocated_gib"] / 40 - 1))
    table = (out / "memory_validation.md").read_text()
    assert "| lora-7b-ddp | lora | ddp | 1 | 4 x 1024 |" in table
