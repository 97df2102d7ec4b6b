"""training.param_dtype=bfloat16 on a CUDA GPU, through `llmtrain finetune` (the CLI, in its own
process): the embedded model's losses track the fp32-parameter path, the saved weights are bf16,
and a run stopped after step 4 and resumed repeats every loss bit for bit. The same checks run on
the CPU under bf16 autocast in tests/unit/test_master_weights.py. Skipped without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from tests.unit.test_master_weights import assert_tracks  # the CPU test's criteria

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def finetune(out: Path, param_dtype: str, max_steps: int) -> list[float]:
    result = subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", "finetune", "configs/demo.yaml",
         "method.name=full", f"training.param_dtype={param_dtype}",
         f"training.max_steps={max_steps}", "training.logging_steps=1", "training.save_steps=4",
         "training.learning_rate=1e-3", "training.lr_scheduler_type=constant",
         "training.per_device_train_batch_size=8", "training.gradient_accumulation_steps=2",
         "training.report_to=[none]", "data.eval_fraction=0", "generation.samples=0",
         "output.merge=false", f"output.dir={out}"],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_bf16_parameters_track_fp32_and_resume_exactly(tmp_path: Path) -> None:
    fp32 = finetune(tmp_path / "fp32", "float32", 8)
    bf16 = finetune(tmp_path / "bf16", "bfloat16", 8)
    assert len(bf16) == 8 and bf16[-1] < 0.5 * bf16[0]
    assert_tracks(bf16, fp32)
    weights = load_file(tmp_path / "bf16/final/model/model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    finetune(tmp_path / "cut", "bfloat16", 4)
    assert finetune(tmp_path / "cut", "bfloat16", 8) == bf16
    resumed = load_file(tmp_path / "cut/final/model/model.safetensors")
    assert all(torch.equal(resumed[k], weights[k]) for k in weights)
