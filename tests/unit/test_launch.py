"""llmtrain.launch: launch.sh's wrapper around torchrun and accelerate keeps the exit code of
the first failed worker (the launchers themselves exit 1 for any failure), so job.sh can apply
the 64/65/75 contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain import launch
from llmtrain.errors import EXIT_DATA, EXIT_STOPPED, EXIT_USAGE

WORKER = """\
import os, signal, sys
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize(
    ("returncode", "status"), [(0, 0), (65, 65), (75, 75), (-9, 137), (-15, 143)]
)
def test_exit_code_is_the_shell_status(returncode: int, status: int) -> None:
    assert launch.exit_code(returncode) == status


@pytest.mark.parametrize("argv", [[], ["deepspeed", "train.py"], ["python", "train.py"]])
def test_unknown_launcher_is_usage_and_runs_nothing(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert launch.main(argv) == EXIT_USAGE
    assert "usage: python3 -m llmtrain.launch torchrun|accelerate" in capsys.readouterr().err


def _run(tmp_path: Path, *launcher: str, mode: str) -> subprocess.CompletedProcess[str]:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    return subprocess.run(
        [sys.executable, "-m", "llmtrain.launch", *launcher, str(worker), mode],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_torchrun_worker_code_comes_through(tmp_path: Path) -> None:
    res = _run(tmp_path, "torchrun", "--standalone", "--nproc-per-node=1", mode=str(EXIT_DATA))
    assert res.returncode == EXIT_DATA, res.stderr


@pytest.mark.slow
def test_torchrun_worker_killed_by_a_signal_is_128_plus_it(tmp_path: Path) -> None:
    res = _run(tmp_path, "torchrun", "--standalone", "--nproc-per-node=2", mode="kill")
    assert res.returncode == 128 + 9, res.stderr


@pytest.mark.slow
def test_accelerate_single_process_code_comes_through(tmp_path: Path) -> None:
    res = _run(tmp_path, "accelerate", "--num_processes=1", "--cpu", mode=str(EXIT_STOPPED))
    assert res.returncode == EXIT_STOPPED, res.stderr
