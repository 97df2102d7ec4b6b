"""The benchmark's bookkeeping: the same samples counted alike padded or packed, refusal of runs
that saw other data or batches, the stated length distribution, the ratios to the peer, and CPU
smoke runs (with the peer where a Python for it is found)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from bench.peer import variants_for
from bench.peer_launch import peer_env
from bench.probe import RunResult, batch_stats, kernel_seconds
from bench.report import NotComparable, add_peer_ratios, check_comparable, metrics, table
from bench.workloads import CAP, MEDIAN, MODELS, WORKLOADS, build_rows, sample_lengths

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


def test_profiled_kernels_are_summed_by_kind_and_cpu_ops_are_not_counted_twice() -> None:
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def evt(
        key: str, us: float, device: torch.autograd.DeviceType = cuda, span: bool = False
    ) -> Any:
        fields = {"key": key, "device_time_total": us, "device_type": device}
        return type("Evt", (), {**fields, "is_user_annotation": span})()

    got = kernel_seconds([
        evt("sm90_xmma_gemm_bf16bf16_bf16f32", 4e6),
        evt("nvjet_tst_128x256_64x4", 1e6),
        evt("flash_fwd_kernel", 2e6),
        evt("cudnn_generated_fort_native_sdpa_sm90", 1e6),
        evt("triton_per_fused_rms_norm_0", 5e5),
        evt("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 3e5),
        evt("Memcpy DtoD (Device -> Device)", 1e5),
        evt("void at::native::elementwise_kernel<128, 2>", 1e5),
        evt("aten::mm", 5e6, cpu),  # its kernels are the gemm entries above
        evt("Optimizer.step#AdamW.step", 3e5, span=True),  # its kernel is the Adam entry
    ])  # fmt: skip
    assert got == pytest.approx({
        "gemm": 5.0, "attention": 3.0, "triton": 0.5, "optimizer": 0.3, "copy": 0.1,
        "other": 0.1, "total": 9.0,
    })  # fmt: skip


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


def test_memory_validation_predicts_with_the_measured_gpus_plan(repo: Path) -> None:
    """On the GPU it measures, memory_validation plans as finetune there: a V100's plan refuses
    bf16 parameters (finetune would), where the default, Ampere or later, plans them."""
    from bench.memory_validation import predict

    from llmtrain.config import load_config
    from llmtrain.errors import NeedsGpuError
    from llmtrain.sizing.gpus import get_gpu

    cfg = load_config(repo / "configs" / "full.yaml", ["training.param_dtype=bfloat16"])
    assert predict(cfg, 1, "sdpa").allocated > 0
    with pytest.raises(NeedsGpuError, match="param_dtype=bfloat16 on a GPU without bf16"):
        predict(cfg, 1, "sdpa", get_gpu("v100"))


def run_row(run: str, tokens: float, effective: float, peak: float | None) -> dict[str, Any]:
    return {
        "workload": "w", "run": run, "tokens_per_s": tokens, "effective_tokens_per_s": effective,
        "padding_share": 0.0, "step_ms": 1.0, "mfu": 0.1, "peak_gib": peak, "first_loss": 2.0,
    }  # fmt: skip


def test_ratios_are_to_the_best_peer_run() -> None:
    """The best peer is the one with the most effective tokens/s, whatever its tokens/s."""
    rows = [
        run_row("baseline", 100, 50, 40.0),
        run_row("peer", 300, 100, 20.0),
        run_row("peer flex", 200, 150, 10.0),
        {"workload": "w", "run": "peer flex+compile", "error": "compile failed"},
        run_row("llmtrain", 400, 300, 5.0),
    ]
    add_peer_ratios(rows)
    ours = rows[-1]
    assert ours["peer_best"] == "peer flex"
    assert ours["peer_tokens_ratio"] == 2.0 and ours["peer_effective_ratio"] == 2.0
    assert ours["peer_memory_ratio"] == 0.5
    assert rows[1]["peer_effective_ratio"] == pytest.approx(2 / 3)
    assert "peer_tokens_ratio" not in rows[0] and "peer_best" not in rows[3]
    row = "| w | llmtrain | 400 | 300 | 0% | 1 | 10.0% | 5.0 | n/a | n/a | n/a | 2.00 | 2.00 |"
    assert row in table([rows[0], rows[-1]])


def test_the_peer_sees_none_of_the_pinned_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/pinned/site", "/other"]))
    path = peer_env(["/peer/site"])["PYTHONPATH"].split(os.pathsep)
    assert path[0] == "/peer/site" and "/pinned/site" not in path and "/other" not in path
    assert [Path(p).name for p in path[1:]] == [Path(path[1]).name, "src"]


def test_flex_runs_only_on_packed_rows() -> None:
    asked = ["peer", "peer flex", "peer+compile", "peer flex+compile"]
    assert variants_for(asked, packed=False) == ["peer", "peer+compile"]
    assert variants_for(asked, packed=True) == asked


def peer_python(repo: Path) -> str:
    """BENCH_PEER_PYTHON, else the repository's .venv-peer (`make venv-peer`); skips without."""
    found = os.environ.get("BENCH_PEER_PYTHON") or str(repo / ".venv-peer" / "bin" / "python")
    if not Path(found).is_file():
        pytest.skip(
            "no Python for the peer (transformers 5.x, peft, accelerate): set BENCH_PEER_PYTHON "
            "or run `make peer`"
        )
    return found


@pytest.mark.slow
def test_smoke_run_with_the_peer(tmp_path: Path, repo: Path) -> None:
    """The peer in its own Python on the smoke workloads: same samples in every step as the
    baseline, its packed samples shown apart, Liger off on a CPU and said so.

    Needs a second Python with transformers 5.x (BENCH_PEER_PYTHON or .venv-peer); CI has none,
    so there this skips."""
    python = peer_python(repo)
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--workloads", "var-tiny-full,fixed-tiny-lora",
         "--variants", "llmtrain", "--peer-variants", "peer", "--peer-python", python,
         "--out", str(tmp_path)],
        cwd=repo, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["workload"], r["run"]) for r in runs] == [
        (w, r)
        for w in ("var-tiny-full", "fixed-tiny-lora")
        for r in ("baseline", "peer", "llmtrain")
    ]
    for base, peer, ours in (runs[:3], runs[3:]):
        assert "error" not in peer and "error" not in ours
        assert peer["raw"]["checksums"] == base["raw"]["checksums"]
        assert peer["max_loss_rel_diff"] < 1e-4
        assert peer["raw"]["notes"]["liger"] is False
        assert ours["peer_best"] == "peer" and ours["peer_tokens_ratio"] > 0
    packed = runs[1]
    assert packed["padding_share"] == 0
    assert packed["raw"]["notes"]["collator"] == "DataCollatorWithFlattening"
    check = packed["raw"]["notes"]["packed_check"]
    assert check["ok"] and check["max_logit_diff"] < 1e-4 < check["leak_logit_diff"]
    md = (tmp_path / "results.md").read_text()
    assert "liger off (no CUDA device" in md and "transformers 5." in md


@pytest.mark.slow
def test_packed_check_sees_samples_that_attend_to_each_other(repo: Path) -> None:
    """The check passes the peer's collator and fails a collator that lets packed samples attend
    to each other, and a model that keeps a KV cache (transformers 5.x then keeps no packed
    sample apart). Needs the peer's Python (see test_smoke_run_with_the_peer); CI skips it."""
    python = peer_python(repo)
    proc = subprocess.run(
        [python, "-c", PACKED_CHECK, json.dumps(MODELS["tiny"])],
        cwd=repo, env=peer_env([]), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["flat"]["ok"] and got["flat"]["max_logit_diff"] < 1e-4
    for leak in ("leaking", "cache"):
        assert not got[leak]["ok"], got[leak]
        assert got[leak]["max_logit_diff"] == pytest.approx(got[leak]["leak_logit_diff"])


# Runs in the peer's Python (transformers 5.x) on the tiny shape given as argv[1].
PACKED_CHECK = """
import json, sys, torch
from transformers import DataCollatorWithFlattening, LlamaConfig, LlamaForCausalLM
from bench.peer import packed_check
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(**json.loads(sys.argv[1]), attn_implementation="sdpa"))
model.config.use_cache = False
features = [
    {"input_ids": ids, "labels": [-100] * 3 + ids[3:]}
    for ids in (torch.randint(3, 512, (n,)).tolist() for n in (11, 7, 20))
]
flat = DataCollatorWithFlattening()
def leaking(f):
    batch = flat(f)
    return {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
out = {"flat": packed_check(model, flat, features, 1e-4)}
out["leaking"] = packed_check(model, leaking, features, 1e-4)
model.config.use_cache = True
out["cache"] = packed_check(model, flat, features, 1e-4)
print(json.dumps(out))
"""


def _trace(*events: tuple[str, str, float, float, int | None, int]) -> dict[str, Any]:
    """Chrome trace events (category, name, start us, duration us, correlation, thread)."""
    return {"traceEvents": [
        {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid,
         **({"args": {"correlation": corr}} if corr is not None else {})}
        for cat, name, ts, dur, corr, tid in events
    ]}


def test_idle_gaps_are_blamed_on_the_sync_or_the_launch_that_ended_them() -> None:
    from bench.gaps import idle_report

    trace = _trace(
        # host: a forward that ends with .item(), then a backward that launches slowly
        ("cpu_op", "forward", 0, 100, None, 1),
        ("cpu_op", "aten::mm", 1, 2, None, 1),
        ("cuda_runtime", "cudaLaunchKernel", 2, 1, 1, 1),
        ("cpu_op", "aten::_local_scalar_dense", 20, 40, None, 1),
        ("cuda_runtime", "cudaStreamSynchronize", 25, 30, None, 1),
        ("cpu_op", "aten::add", 70, 5, None, 1),
        ("cuda_runtime", "cudaLaunchKernel", 72, 1, 2, 1),
        ("cpu_op", "backward", 120, 100, None, 1),
        ("cpu_op", "aten::mul", 150, 5, None, 1),
        ("cuda_runtime", "cudaLaunchKernel", 152, 1, 3, 1),
        ("cpu_op", "aten::copy_", 160, 5, None, 1),
        ("cuda_runtime", "cudaLaunchKernel", 161, 1, 4, 1),
        # GPU: 3..53 busy; idle 53..80 (after the sync); 80..100 busy; idle 100..155 (launch);
        # a kernel on a second stream overlapping the third: no gap; a 1 us gap is not blamed
        ("kernel", "k1", 3, 50, 1, 7),
        ("kernel", "k2", 80, 20, 2, 7),
        ("kernel", "k3", 155, 5, 3, 7),
        ("gpu_memcpy", "copy", 157, 4, None, 8),
        ("kernel", "k4", 162, 10, 4, 7),
    )
    report = idle_report(trace, steps=1)
    assert report["window_us"] == 172 - 3
    assert report["idle_us"] == 27 + 55 + 1
    assert report["busy_us"] == report["window_us"] - report["idle_us"]
    assert report["short_gaps_us"] == 1
    assert report["by_blame"] == [
        ["launch: aten::mul", 55.0, 1],
        ["after sync: aten::_local_scalar_dense", 27.0, 1],
    ]
    assert report["by_phase"] == [["backward", 55.0, 1], ["forward", 27.0, 1]]


def test_idle_report_refuses_a_trace_without_gpu_work() -> None:
    from bench.gaps import idle_report

    with pytest.raises(ValueError, match="no GPU kernels"):
        idle_report(_trace(("cpu_op", "aten::mm", 0, 5, None, 1)), steps=1)
