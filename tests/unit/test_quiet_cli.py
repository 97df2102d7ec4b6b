"""The real CLI prints what the user asked for and nothing else: no traceback when its reader
goes away (`llmtrain env | head -1`), no libraries' import-time notes ("PyTorch version ...
available.") in any verb's output, while llmtrain's own progress notes still show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

# 128 + SIGPIPE: what a tool killed by a closed pipe exits with.
EXIT_PIPE = 141


@pytest.mark.parametrize("args", [["env", "--short"], ["env"]])
def test_a_closed_stdout_ends_quietly(args: list[str]) -> None:
    """The reader closes the pipe before the first line is written (`| head -0`, `| true`)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtrain.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the interpreter has imported anything
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == EXIT_PIPE
    assert stderr == ""


def test_head_of_env_gets_its_line_and_no_traceback() -> None:
    proc = subprocess.run(
        ["bash", "-c", f"'{sys.executable}' -m llmtrain.cli env --short | head -1"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert proc.stdout == "{\n"
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["estimate", "configs/lora.yaml"],
        ["doctor"],
        # merge imports the whole stack before it finds the adapter missing.
        ["merge", "--base", "embedded:tiny-llama", "--adapter", "absent", "--out", "out"],
        ["env", "--short"],
    ],
    ids=lambda a: a[0],
)
def test_no_library_import_notes(args: list[str], tmp_path: Path) -> None:
    proc = run_cli(*args, cwd=tmp_path if args[0] == "merge" else None, timeout=300)
    output = proc.stdout + proc.stderr
    assert "available." not in output and "PyTorch version" not in output, output
    assert "Traceback" not in output, output


def test_own_info_notes_still_show(tmp_path: Path) -> None:
    proc = run_cli("prepare", "configs/lora.yaml", f"output.dir={tmp_path / 'run'}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[llmtrain] data, " in proc.stderr  # prepared.py's TokenizeStats summary, at INFO
    assert "PyTorch version" not in proc.stderr
