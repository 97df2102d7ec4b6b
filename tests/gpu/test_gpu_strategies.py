"""Check a GPU node before a long job: every validated method x strategy trains a few steps on
the GPUs this process sees, saves a normal HF directory, and that directory loads (an adapter
also merges) in a fresh process; the refused combinations exit 64; DeepSpeed and FSDP resume
from their own checkpoints. Skipped, with the reason, where there is no CUDA GPU. One command,
from a checkout of this repository inside the image (srun/qsub it onto the node to check):

  apptainer exec --nv llmtrain.sif python -m pytest -m gpu tests/gpu
  srun --container-image=$PWD/llmtrain.sqsh --container-workdir=$PWD \
      python -m pytest -m gpu tests/gpu
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtrain.plan import VALIDATED
from tests.conftest import REPO

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU (this suite checks a GPU node)"),
]
COMMON = [
    "training.max_steps=4",
    "training.save_steps=2",
    "training.logging_steps=1",
    "training.report_to=[none]",
    "generation.samples=0",
    "output.merge=false",
]
COMBOS = [(m, s) for m, strategies in VALIDATED.items() for s in strategies]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def finetune(
    out: Path, method: str, strategy: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`llmtrain finetune` on one GPU, or under torchrun on every visible GPU."""
    launcher = (
        []
        if strategy == "single"
        else [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={GPUS}",
            f"--master-port={free_port()}",
        ]
    )
    cmd = [
        sys.executable,
        *launcher,
        "-m",
        "llmtrain.cli",
        "finetune",
        f"configs/{method}.yaml",
        f"output.dir={out}",
        f"distributed.strategy={'auto' if strategy == 'single' else strategy}",
        *COMMON,
        *extra,
    ]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


# In a fresh process: load the result as `llmtrain generate` does; an adapter is also merged as
# `llmtrain merge` does, and the merged model loaded again (a LoRA one gives the same logits,
# compared in fp32: in bf16 the two paths round apart by a few steps of 0.0625 at logits near
# 12, 0.2 on the H200, whatever the merge; a QLoRA adapter merges into the unquantized base, so
# only finite logits are asked of it).
PROBE = """
import sys, tempfile, torch
from pathlib import Path
from llmtrain.config import ModelSection
from llmtrain.model.export import load_for_inference, merge
kind, path = sys.argv[1], Path(sys.argv[2])
base = ModelSection(path="embedded:tiny-llama")

def logits_of(model, tok):
    ids = tok(["Question: What is 3 plus 4?\\nAnswer:"], return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        out = model(input_ids=ids).logits.float()
    assert torch.isfinite(out).all(), "non-finite logits"
    return out

if kind in ("lora", "qlora"):
    dtype = torch.float32 if kind == "lora" else None
    logits = logits_of(*load_for_inference(base, path, dtype=dtype, quantized=kind == "qlora"))
    merged = merge(base, path, Path(tempfile.mkdtemp()) / "merged", dtype=dtype)
    merged_base = base.model_copy(update={"path": str(merged)})
    merged_logits = logits_of(*load_for_inference(merged_base, None, dtype=dtype))
    if kind == "lora":
        diff = float((merged_logits - logits).abs().max())
        assert diff <= 1e-3, f"merged model differs by {diff}"
else:
    logits = logits_of(*load_for_inference(base.model_copy(update={"path": str(path)}), None))
print(float(logits.abs().max()))
"""


@pytest.mark.parametrize(("method", "strategy"), COMBOS, ids=[f"{m}-{s}" for m, s in COMBOS])
def test_trains_saves_and_reloads(tmp_path: Path, method: str, strategy: str) -> None:
    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed")
    skip_without_deepspeed(strategy)
    if strategy != "single" and GPUS < 2:
        pytest.skip(f"{strategy} is checked on 2 or more GPUs; this node shows {GPUS}")
    result = finetune(tmp_path, method, strategy)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    values = [v for r in records for v in r.get("loss_exact", [])]
    assert len(values) == 4 and all(v == v and v < 100 for v in values), values
    # configs/dpo.yaml and orpo.yaml train LoRA weights (preference.weights: lora)
    kind = "lora" if method in ("dpo", "orpo") else method
    adapter = kind in ("lora", "qlora")
    final = tmp_path / "final" / ("adapter" if adapter else "model")
    weights = final / ("adapter_model.safetensors" if adapter else "model.safetensors")
    assert weights.is_file() and weights.stat().st_size > 10_000  # not empty ZeRO-3 shards
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, kind, str(final)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["fsdp", "zero3", "zero3_offload"])
def test_qlora_sharded_is_refused(tmp_path: Path, strategy: str) -> None:
    result = finetune(tmp_path, "qlora", "single", f"distributed.strategy={strategy}")
    assert result.returncode == 64
    assert "not possible with peft 0.9.0" in result.stderr


def skip_without_deepspeed(strategy: str) -> None:
    """The image has DeepSpeed; a GPU machine without it gets exit 64 from finetune's check
    (tests/strategies/test_configs.py), not a run to test."""
    if strategy.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")


def worker_exit(result: subprocess.CompletedProcess[str]) -> int:
    """torchrun exits 1 for any failed worker and names the worker's own code in its summary
    (entrypoint/launch.sh passes that code on to the job script)."""
    found = re.search(r"exitcode\s*:\s*(-?\d+)", result.stderr)
    return int(found.group(1)) if found else result.returncode


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp"])
def test_resume_from_own_checkpoint(tmp_path: Path, strategy: str) -> None:
    """LoRA (whose DeepSpeed checkpoints leave out the frozen weights) stops on the stop file,
    checkpoints, and a second run resumes from that checkpoint and finishes."""
    skip_without_deepspeed(strategy)
    stop = tmp_path / "stop"
    stop.touch()
    first = finetune(tmp_path / "run", "lora", strategy, env={"LLMTRAIN_STOP_FILE": str(stop)})
    assert worker_exit(first) == 75, first.stderr[-4000:]
    stop.unlink()
    second = finetune(tmp_path / "run", "lora", strategy)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from" in second.stderr
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss_exact" in r]
    assert steps[-1] == 4 and len(steps) == len(set(steps)), steps  # no step done twice
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").is_file()
