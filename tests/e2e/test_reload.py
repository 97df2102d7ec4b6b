"""A saved model or adapter reloads in a fresh process with the logits of the trained model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtrain.config import load_config
from llmtrain.plan import World
from llmtrain.train.run import train
from tests.e2e.test_finetune_cli import PROBE

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["lora", "full"])
def test_saved_result_reloads_with_same_logits(method: str, tmp_path: Path) -> None:
    cfg = load_config(f"configs/{method}.yaml", [
        f"output.dir={tmp_path}", "training.max_steps=6", "generation.samples=0",
        "output.merge=false", "model.dtype=float32", "training.report_to=[none]",
    ])
    model = train(cfg, World(rank=0, local_rank=0, world_size=1)).model
    model.eval()
    from llmtrain.model.load import load_tokenizer

    tok = load_tokenizer(cfg.model)
    batch = tok(["Question: What is 3 plus 4?\nAnswer:", "Question: What is 9 minus 2?\nAnswer:"],
                return_tensors="pt", padding=True)
    with torch.no_grad():
        trained = model(**batch).logits
    kind = "adapter" if method == "lora" else "model"
    result = subprocess.run([sys.executable, "-c", PROBE, kind, str(tmp_path / "final" / kind)],
                            capture_output=True, text=True, check=True)
    reloaded = torch.tensor(json.loads(result.stdout))
    assert torch.allclose(trained, reloaded, atol=1e-5), (trained - reloaded).abs().max()
