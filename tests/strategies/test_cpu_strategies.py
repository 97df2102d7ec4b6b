"""DDP and FSDP on CPU (gloo), 2 processes, the embedded tiny Llama, through the real launcher
(entrypoint/launch.sh with torchrun, and with accelerate and configs/accelerate/fsdp.yaml).

On CPU everything is fp32, so a 2-process run with half the micro-batch must give the losses
and final weights of a one-process run to rounding: a shard saved instead of the full state
dict, or an optimizer that steps parameters FSDP no longer uses, fails here. DeepSpeed is GPU
only (accelerate 0.26 starts it with NCCL): tests/gpu covers it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

STEPS = 6
# Fixed-length packed blocks: every micro-batch holds the same number of loss tokens, so the
# mean of the ranks' mean losses is the one-process mean (with padding it would not be).
COMMON = [
    "data.path=embedded:corpus.txt",
    "data.shape=text",
    "data.packing=blocks",
    "data.max_length=64",
    f"training.max_steps={STEPS}",
    "training.save_steps=3",
    "training.logging_steps=1",
    "training.report_to=[none]",
    "training.warmup_ratio=0",
    "generation.samples=0",
    "output.merge=false",
    "lora.dropout=0",  # one process and two draw different masks (configs/lora.yaml has 0.05)
]
# The toy settings these comparisons were made for: configs/lora.yaml carries a real model's
# (accumulation 4, lr 2e-4), configs/demo.yaml the embedded model's LoRA settings.
CONFIG = {"full": "configs/full.yaml", "lora": "configs/demo.yaml", "layers": "configs/layers.yaml"}
BATCH = 16  # per process in a one-process run; halved for two


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_env(processes: int) -> dict[str, str]:
    """The environment job.sh gives launch.sh on one node, with this venv first on PATH."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "NNODES": "1",
        "NODE_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "NPROC_PER_NODE": str(processes),
    }


def torchrun(script: str, out: Path, ranks: int) -> None:
    """`script` (a test file that trains or checks when run as a program) on `ranks` gloo
    processes under torch.distributed.run, with `out` as its argument; asserts it exits 0."""
    env = launch_env(ranks)
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
            f"--nproc-per-node={ranks}", f"--master-addr={env['MASTER_ADDR']}",
            f"--master-port={env['MASTER_PORT']}", script, str(out),
        ],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]


def launch(
    out: Path, method: str, strategy: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """entrypoint/launch.sh as job.sh would call it on a one-node allocation, in the venv."""
    full_env = {**launch_env(2), **(env or {})}
    return subprocess.run(
        [
            str(REPO / "entrypoint" / "launch.sh"),
            CONFIG[method],
            f"output.dir={out}",
            f"distributed.strategy={strategy}",
            f"training.per_device_train_batch_size={BATCH // 2}",
            *COMMON,
            *extra,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full_env,
        timeout=600,
    )


def losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [v for r in map(json.loads, lines) for v in r.get("loss_exact", [])]


def final_weights(out: Path, method: str) -> dict[str, torch.Tensor]:
    if method == "lora":
        return load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    return load_file(out / "final" / "model" / "model.safetensors")


RUNS = [("ddp", "full"), ("ddp", "lora"), ("ddp", "layers"), ("fsdp", "full"), ("fsdp", "lora")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("strategies")
    outs: dict[str, Path] = {}
    for method in ("full", "lora", "layers"):
        out = base / f"single-{method}"
        result = run_cli(
            "finetune",
            CONFIG[method],
            f"output.dir={out}",
            f"training.per_device_train_batch_size={BATCH}",
            *COMMON,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        outs[f"single-{method}"] = out
    for strategy, method in RUNS:
        out = base / f"{strategy}-{method}"
        result = launch(out, method, strategy)
        assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
        assert "launch: node_rank=0 nnodes=1" in result.stdout
        outs[f"{strategy}-{method}"] = out
    return outs


@pytest.mark.parametrize(("strategy", "method"), RUNS)
def test_two_processes_match_one(runs: dict[str, Path], strategy: str, method: str) -> None:
    out, single = runs[f"{strategy}-{method}"], runs[f"single-{method}"]
    two, one = losses(out), losses(single)
    assert len(two) == len(one) == STEPS
    assert two[-1] < two[0]  # it learns
    assert torch.allclose(torch.tensor(two), torch.tensor(one), rtol=1e-4), (two, one)
    w2, w1 = final_weights(out, method), final_weights(single, method)
    assert w2.keys() == w1.keys()
    for key in w1:  # whole tensors, equal to the one-process result: not shards, not stale
        assert w2[key].shape == w1[key].shape, key
        assert torch.allclose(w2[key], w1[key], atol=1e-4), key
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"] == strategy and manifest["world_size"] == 2
    if method == "lora":  # B starts at zero: a saved adapter that never trained is all zeros
        assert max(float(w.abs().max()) for k, w in w2.items() if "lora_B" in k) > 1e-3


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_checkpoints_are_sharded(runs: dict[str, Path], method: str) -> None:
    ckpt = runs[f"fsdp-{method}"] / "checkpoint-6"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and (ckpt / "optimizer_0").is_dir()
    assert (ckpt / "llmtrain-complete.json").is_file()


def test_fsdp_results_load_in_fresh_processes(runs: dict[str, Path], tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    result = run_cli(
        "merge",
        "--base",
        "embedded:tiny-llama",
        "--adapter",
        str(runs["fsdp-lora"] / "final" / "adapter"),
        "--out",
        str(merged),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Question: What is 2 plus 3?\\nAnswer:"}\n')
    for model in (merged, runs["fsdp-full"] / "final" / "model"):
        answers = tmp_path / f"{model.name}.jsonl"
        result = run_cli(
            "generate",
            "configs/full.yaml",
            "--model",
            str(model),
            "--prompts",
            str(prompts),
            "--out",
            str(answers),
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(answers.read_text())["prompt"].endswith("Answer:")


def test_fsdp_resume_from_sharded_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    out, stop = tmp_path / "resumed", tmp_path / "stop"
    stop.touch()
    first = launch(out, "lora", "fsdp", env={"LLMTRAIN_STOP_FILE": str(stop)})
    assert first.returncode == 75, first.stderr[-3000:]
    assert (out / "checkpoint-1" / "pytorch_model_fsdp_0").is_dir()
    stop.unlink()
    second = launch(out, "lora", "fsdp")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    assert torch.allclose(
        torch.tensor(losses(out)), torch.tensor(losses(runs["fsdp-lora"])), rtol=1e-4
    )


def test_accelerate_fsdp_config(tmp_path: Path) -> None:
    env = {"LAUNCHER": "accelerate", "ACCELERATE_CONFIG": "configs/accelerate/fsdp.yaml"}
    out = tmp_path / "acc"
    result = launch(out, "lora", "auto", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["strategy"] == "fsdp"
    assert (out / "checkpoint-6" / "pytorch_model_fsdp_0").is_dir()
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    clash = launch(tmp_path / "clash", "lora", "ddp", env=env)
    assert clash.returncode == 64
    assert "accelerate launch was given an FSDP config but distributed.strategy=ddp" in (
        clash.stderr
    )


def test_deepspeed_on_cpu_is_refused(tmp_path: Path) -> None:
    result = run_cli(
        "finetune",
        "configs/lora.yaml",
        f"output.dir={tmp_path}",
        "distributed.strategy=zero2",
        *COMMON,
    )
    assert result.returncode == 64
    assert "needs CUDA GPUs: accelerate 0.26 starts DeepSpeed with NCCL only" in result.stderr
