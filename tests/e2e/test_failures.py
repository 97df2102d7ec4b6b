"""Hangs become failures, and secrets stay out of logs and outputs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dead_rank_makes_the_survivor_exit_nonzero_within_the_timeout(tmp_path: Path) -> None:
    """Two gloo ranks started by hand (no torchrun agent to clean up): kill one mid-training."""
    timeout_s = 30
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "llmtrain.cli", "finetune", "configs/demo.yaml",
             f"output.dir={tmp_path}", "training.max_steps=100000", "training.save_steps=100000",
             "training.logging_steps=1", "generation.samples=0", "training.report_to=[none]",
             f"distributed.timeout_minutes={timeout_s / 60}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        code = procs[0].wait(timeout=timeout_s + 60)
    finally:
        for p in procs:
            p.kill()
    assert code != 0
    assert time.monotonic() - killed_at <= timeout_s + 60


def test_planted_token_never_reaches_logs_or_outputs(tmp_path: Path) -> None:
    secret = "hf_PLANTEDsecretVALUE1234567890"
    out = tmp_path / "run"
    result = run_cli("finetune", "configs/demo.yaml", f"output.dir={out}", "training.max_steps=4",
                     "training.save_steps=2", "generation.samples=2",
                     env={"HF_TOKEN": secret, "WANDB_API_KEY": secret, "NCCL_DEBUG": "INFO"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert secret not in result.stdout + result.stderr
    leaked = [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked
    assert '"HF_TOKEN": "***"' in (out / "manifest.json").read_text()
