"""DoRA and rsLoRA end to end on CPU through the real CLI, on the embedded tiny Llama: the loss
falls, the adapter_config.json carries the variant so peft alone reloads the adapter, the merged
model has the adapter's logits, and generate answers with the adapter."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmtrain.config import load_config
from llmtrain.plan import World
from llmtrain.train.run import train
from tests.conftest import REPO, run_cli
from tests.e2e.test_finetune_cli import losses

pytestmark = pytest.mark.slow

BASE = REPO / "src" / "llmtrain" / "embedded" / "tiny-llama"
VARIANTS = {"dora": "lora.use_dora=true", "rslora": "lora.use_rslora=true"}
# configs/lora.yaml may change; these are the settings the assertions depend on.
SETTINGS = [
    "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "training.learning_rate=3e-3",
    "training.warmup_ratio=0", "training.report_to=[none]", "training.save_steps=100",
    "generation.samples=0",
]
IDS = [[1, 5, 17, 42, 99, 7, 250, 3, 64, 11]]  # fixed token ids: no tokenizer or padding involved

# Only transformers and peft: what a user of the saved adapter has without llmtrain.
PEFT_PROBE = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, path, ids = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
if path != "-":
    model = PeftModel.from_pretrained(model, path)
assert "llmtrain" not in sys.modules
with torch.no_grad():
    print(json.dumps(model.eval()(input_ids=ids).logits.tolist()))
"""


def probe(model_dir: Path, adapter: Path | None = None) -> torch.Tensor:
    """Logits of IDS in a fresh process: model_dir alone, or with the adapter through peft."""
    result = subprocess.run(
        [sys.executable, "-c", PEFT_PROBE, str(model_dir), str(adapter or "-"), json.dumps(IDS)],
        capture_output=True, text=True, check=True,
    )
    return torch.tensor(json.loads(result.stdout))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    base = tmp_path_factory.mktemp("variants")
    outs = {}
    for name, override in VARIANTS.items():
        out = base / name
        result = run_cli("finetune", "configs/lora.yaml", f"output.dir={out}", override,
                         *SETTINGS, "training.max_steps=12", "training.logging_steps=2",
                         "output.merge=true")
        assert result.returncode == 0, result.stderr[-3000:]
        outs[name] = (out, result.stderr)
    return outs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loss_falls_and_fused_path_as_designed(
    runs: dict[str, tuple[Path, str]], variant: str
) -> None:
    out, log = runs[variant]
    values = losses(out)
    assert len(values) == 6 and values[-1] < 0.5 * values[0], values
    found = re.search(r"fused LoRA: (\d+) adapted linear layers", log)
    assert found, log[-2000:]
    fused = int(found.group(1))
    if variant == "dora":
        assert fused == 0
        assert len(re.findall(r"\d+ DoRA layers keep peft's forward", log)) == 1
    else:
        assert fused > 0 and "DoRA" not in log


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapter_config_carries_the_variant_and_peft_alone_reloads_it(
    runs: dict[str, tuple[Path, str]], variant: str, tmp_path: Path
) -> None:
    adapter = runs[variant][0] / "final" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert (saved["use_dora"], saved["use_rslora"]) == (variant == "dora", variant == "rslora")
    assert saved["init_lora_weights"] is True
    with_adapter = probe(BASE, adapter)
    merged = probe(runs[variant][0] / "final" / "merged")
    assert torch.allclose(with_adapter, merged, atol=1e-4), (with_adapter - merged).abs().max()
    assert (with_adapter - probe(BASE)).abs().max() > 1e-2  # the adapter changed the model
    # The saved flag is what peft reads: without it the same weights give other logits.
    flipped = tmp_path / "flipped"
    shutil.copytree(adapter, flipped)
    key = "use_dora" if variant == "dora" else "use_rslora"
    (flipped / "adapter_config.json").write_text(json.dumps({**saved, key: False}))
    assert (probe(BASE, flipped) - with_adapter).abs().max() > 1e-3


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generate_with_the_adapter_and_with_the_merged_model(
    runs: dict[str, tuple[Path, str]], variant: str, tmp_path: Path
) -> None:
    final = runs[variant][0] / "final"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Question: What is 1 plus 1?\\nAnswer:"}\n')
    answers = []
    for source in (["--adapter", str(final / "adapter")], ["--model", str(final / "merged")]):
        out = tmp_path / f"{source[0].strip('-')}.jsonl"
        # No variant override: generate reads it from the adapter's config.
        result = run_cli("generate", "configs/lora.yaml", "generation.max_new_tokens=4",
                         *source, "--prompts", str(prompts), "--out", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
        (record,) = [json.loads(x) for x in out.read_text().splitlines()]
        answers.append(record["output"])
    assert answers[0] == answers[1]  # greedy: the adapter and the merged model agree


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trained_model_and_peft_reload_have_the_same_logits(variant: str, tmp_path: Path) -> None:
    """The model as trained (rsLoRA: through the fused path) against peft alone from disk."""
    cfg = load_config("configs/lora.yaml", [
        f"output.dir={tmp_path}", VARIANTS[variant], *SETTINGS, "training.max_steps=4",
        "output.merge=false", "model.dtype=float32",
    ])
    model = train(cfg, World(rank=0, local_rank=0, world_size=1)).model
    with torch.no_grad():
        trained = model.eval()(input_ids=torch.tensor(IDS)).logits
    reloaded = probe(BASE, tmp_path / "final" / "adapter")
    assert torch.allclose(trained, reloaded, atol=1e-5), (trained - reloaded).abs().max()
