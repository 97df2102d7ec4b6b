"""A hub id resolves from HF_HOME with HF_HUB_OFFLINE=1, as on a compute node without internet.

The cache is laid out the way huggingface_hub writes it (models--ORG--NAME/snapshots/REV and
refs/main), filled with the embedded tiny Llama, so the real hub-loading code runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmtrain.config import resolve_path
from tests.conftest import run_cli

pytestmark = pytest.mark.slow
REVISION = "0123456789abcdef0123456789abcdef01234567"


def fill_cache(hf_home: Path) -> None:
    repo = hf_home / "hub" / "models--llmtrain-test--tiny-llama"
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(resolve_path("embedded:tiny-llama"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


def test_hub_id_trains_offline_from_hf_home(tmp_path: Path) -> None:
    fill_cache(tmp_path / "hf")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = run_cli("finetune", "configs/demo.yaml", "model.path=llmtrain-test/tiny-llama",
                     f"output.dir={tmp_path / 'out'}", "training.max_steps=3",
                     "generation.samples=0", "output.merge=false", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "final" / "adapter" / "adapter_config.json").is_file()


def test_hub_id_missing_from_the_cache_says_how_to_fix(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("validate", "configs/lora.yaml", "model.path=llmtrain-test/absent", env=env)
    assert result.returncode == 64
    assert "HF_HOME" in result.stderr and "Traceback" not in result.stderr
