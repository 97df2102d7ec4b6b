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


def _gradients(params: list[torch.Tensor], step: int, micro_batch: int) -> list[torch.Tensor]:
    """bf16 gradients that do not depend on the parameters, so both paths get the same ones at
    every step: normal values scaled by 10^U(-9, -1), down to below AdamW's eps, where the
    update is most sensitive to rounding."""
    g = torch.Generator(device="cuda").manual_seed(100 * step + micro_batch)
    return [
        (torch.randn(p.shape, device="cuda", generator=g)
         * 10.0 ** torch.empty(p.shape, device="cuda").uniform_(-9, -1, generator=g)
         ).to(torch.bfloat16)
        for p in params
    ]  # fmt: skip


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_one_pass_kernel_steps_as_torch_fused_adamw(micro_batches: int) -> None:
    """kernels/master_adamw.py against torch's fused AdamW on the same fp32 masters (the path
    MasterWeights takes where the kernel cannot run), with the clip folded into both: 5 steps
    of two parameter groups (weight decay on the weights only) at a falling learning rate,
    one micro-batch per step (the kernel reads the bf16 gradients) or two (their fp32 sum).
    Both paths get the same gradients at every step, so they differ only by fp32 rounding
    (the Triton interpreter put them 1 ulp apart after one step and 5 after five): rtol 1e-5
    after every step. Each path's bf16 parameters are its masters rounded to nearest.

    (Gradients from a backward through each path's own parameters would not do: a parameter
    one bf16 unit apart changes the next gradients, and the two trajectories drift apart by
    more than rounding: up to 3.4e-4 after 5 steps on an H200.)"""
    from torch import nn

    from llmtrain.kernels import master_adamw
    from llmtrain.train.master_weights import MasterWeights

    assert master_adamw.unusable_here() is None
    runs = []
    for one_pass in (True, False):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(256, 1000), nn.GELU(), nn.Linear(1000, 3))
        net = net.cuda().to(torch.bfloat16)
        params = list(net.parameters())
        masters = MasterWeights(max_grad_norm=0.3)
        # Two groups, as the Trainer builds them (weights decay, biases do not).
        groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() == 1], "weight_decay": 0.0}]  # fmt: skip
        optimizer = torch.optim.AdamW(groups, lr=1e-2, fused=True)
        masters.attach(optimizer)
        assert masters.one_pass
        masters.one_pass = one_pass  # False: torch's fused AdamW steps the same masters
        trace: list[list[torch.Tensor]] = []
        for k in range(5):
            for group in optimizer.param_groups:  # a schedule: another lr every step
                group["lr"] = 1e-2 * 0.7**k
            for j in range(micro_batches):
                for p, grad in zip(params, _gradients(params, k, j), strict=True):
                    p.grad = grad
                masters.accumulate()
            optimizer.step()
            assert masters.last_grad_norm is not None
            trace.append([masters.last_grad_norm.clone(), *(m.clone() for m in masters.masters)])
            for p, m in zip(masters.params, masters.masters, strict=True):  # group order
                assert p.dtype == torch.bfloat16 and torch.equal(p, m.to(torch.bfloat16))
        steps = [float(optimizer.state[m]["step"]) for m in masters.masters]
        assert steps == [5.0] * len(steps)
        runs.append(trace)
    kernel, torch_path = runs
    assert all(float(step[0]) > 0.3 for step in kernel)  # the clip did something
    for k, (ours, theirs) in enumerate(zip(kernel, torch_path, strict=True)):
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=0, msg=f"norm {k}")
        for a, b in zip(ours[1:], theirs[1:], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=f"step {k}")
