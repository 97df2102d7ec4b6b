"""The token-weighted step loss on GPUs, under every strategy: the two samples of
tests/strategies/test_loss_weighting.py (4 and 36 loss tokens) in one optimizer step as batch 2
on one GPU, batch 1 x accumulation 2, and 2 ranks x batch 1 under DDP, ZeRO-2, ZeRO-3 and
FSDP. fp32, plain SGD, no clipping: the logged loss must be the token mean and the update the
same in every layout. Skipped without 2 CUDA GPUs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.strategies.test_cpu_strategies import free_port
from tests.strategies.test_loss_weighting import args, logged, token_mean, update

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS < 2, reason="needs 2 CUDA GPUs"),
]
__all__ = ["token_mean"]  # the fixture, shared with the CPU test
FP32 = ["training.precision=fp32", "model.dtype=float32"]


def run(data: Path, out: Path, method: str, procs: int, batch: int, accum: int,
        strategy: str) -> None:
    """One GPU, or torchrun with one process per GPU (as tests/gpu/test_gpu_strategies.py)."""
    cli = [*args(data, out, method, "none", batch, accum), *FP32]
    launcher = [] if procs == 1 else [
        "-m", "torch.distributed.run", f"--nproc-per-node={procs}", f"--master-port={free_port()}"
    ]
    result = subprocess.run(
        [sys.executable, *launcher, "-m", "llmtrain.cli", "finetune", *cli,
         f"distributed.strategy={'auto' if procs == 1 else strategy}"],
        capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_every_strategy_gives_the_token_mean_and_one_update(
    token_mean: tuple[Path, float], tmp_path: Path, method: str
) -> None:
    data, expected = token_mean
    layouts = {
        "batch2": (1, 2, 1, "single"),
        "batch1-accum2": (1, 1, 2, "single"),
        "ddp": (2, 1, 1, "ddp"),
        "zero2": (2, 1, 1, "zero2"),
        "zero3": (2, 1, 1, "zero3"),
        "fsdp": (2, 1, 1, "fsdp"),
    }
    updates = {}
    for name, (procs, batch, accum, strategy) in layouts.items():
        out = tmp_path / name
        run(data, out, method, procs, batch, accum, strategy)
        _, exact = logged(out)
        assert exact == pytest.approx(expected, rel=1e-4), name
        updates[name] = update(out, method)
    reference = updates["batch2"]
    assert float(reference.norm()) > 0
    for name, u in updates.items():
        rel = float((u - reference).norm() / reference.norm())
        assert rel < 1e-4, (name, rel)
