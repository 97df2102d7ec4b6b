"""A Llama checkpoint as transformers 5.x saves it (RoPE base under `rope_parameters`, no
`rope_theta`): transformers 4.37.2 would load it with the default RoPE base and no error, a
subtly wrong model. On the pinned stack `validate` and `finetune` exit 64 before loading it,
name the key and the current stack, and write nothing; on the current stack it validates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from llmtrain import stack
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow
EMBEDDED = REPO / "src" / "llmtrain" / "embedded" / "tiny-llama"


def saved_by_5x(t: Path) -> Path:
    """The embedded tiny Llama with its config rewritten the way transformers 5.x writes it."""
    model = t / "llama-5x"
    shutil.copytree(EMBEDDED, model)
    config = json.loads((model / "config.json").read_text())
    theta = config.pop("rope_theta", 10000.0) * 50  # a base other than the default
    config.pop("rope_scaling", None)
    config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    config["dtype"] = config.pop("torch_dtype", "float32")
    config["transformers_version"] = "5.0.0"
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_a_checkpoint_saved_by_transformers_5_is_refused_on_the_pinned_stack(
    tmp_path: Path,
) -> None:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["model"]["path"] = str(saved_by_5x(tmp_path))
    raw["output"]["dir"] = str(tmp_path / "out")
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(raw))
    validate = run_cli("validate", str(run_yaml), cwd=tmp_path)
    if stack.is_current():
        assert validate.returncode == 0, validate.stderr
        return
    finetune = run_cli("finetune", str(run_yaml), cwd=tmp_path)
    for result in (validate, finetune):
        assert result.returncode == 64, result.stderr
        assert "Traceback" not in result.stderr
        assert "rope_parameters" in result.stderr
        assert "make image STACK=current" in result.stderr
    assert not (tmp_path / "out").exists()
