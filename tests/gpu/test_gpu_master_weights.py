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


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_one_pass_kernel_steps_as_torch_fused_adamw(micro_batches: int) -> None:
    """kernels/master_adamw.py against torch's fused AdamW on the same fp32 masters (the path
    MasterWeights takes where the kernel cannot run), with the clip folded into both: 5 steps,
    one micro-batch per step (the kernel reads the bf16 gradients) or two (their fp32 sum).
    Tolerance: after the first step, from the same state, fp32 rounding (the bias corrections
    by exp and log against pow): rtol 1e-5. Later steps start from bf16 parameters that may
    round one unit apart, so the runs drift as two trajectories do: rtol 2e-3 after 5."""
    from torch import nn

    from llmtrain.kernels import master_adamw
    from llmtrain.train.master_weights import MasterWeights

    assert master_adamw.unusable_here() is None
    runs = []
    for one_pass in (True, False):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(256, 1000), nn.GELU(), nn.Linear(1000, 3))
        net = net.cuda().to(torch.bfloat16)
        masters = MasterWeights(max_grad_norm=0.3)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        masters.attach(optimizer)
        assert masters.one_pass
        masters.one_pass = one_pass  # False: torch's fused AdamW steps the same masters
        first: list[torch.Tensor] = []
        for k in range(5):
            for j in range(micro_batches):
                g = torch.Generator(device="cuda").manual_seed(10 * k + j)
                x = torch.randn(64, 256, device="cuda", generator=g, dtype=torch.bfloat16)
                net(x).float().pow(2).mean().backward()
                masters.accumulate()
            optimizer.step()
            if k == 0:
                assert masters.last_grad_norm is not None
                first = [masters.last_grad_norm.clone(), *(m.clone() for m in masters.masters)]
        steps = [float(optimizer.state[m]["step"]) for m in masters.masters]
        assert steps == [5.0] * len(steps)
        runs.append((first, masters.masters, list(net.parameters())))
    (first, kernel, kernel_params), (first_torch, torch_path, torch_params) = runs
    assert float(first[0]) > 0.3  # the clip did something
    torch.testing.assert_close(first[0], first_torch[0], rtol=1e-6, atol=0)
    for a, b in zip(first[1:], first_torch[1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for a, b in zip(kernel, torch_path, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-4)
    for a, b in zip(kernel_params, torch_params, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)
