"""One optimizer step over two samples with 4 and 36 loss tokens (embedded tiny Llama and its
SentencePiece tokenizer), laid out three ways through the real CLI: batch 2; batch 1 x
gradient accumulation 2; 2 gloo ranks x batch 1 (entrypoint/launch.sh with torchrun). The
step's loss must be the token mean (sum of the 40 token losses / 40) in every layout, logged
as such, and the parameter update must be the same within 1e-5 relative, for full and LoRA,
padded and padding-free. Plain SGD without clipping, so the update is the gradient itself
(Adam's first step is lr * sign(g) and would hide a wrongly weighted gradient).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmtrain.config import resolve_path
from llmtrain.labels import IGNORE_INDEX
from tests.conftest import REPO, run_cli
from tests.strategies.test_cpu_strategies import launch_env

pytestmark = pytest.mark.slow

ROWS = [
    {"question": "What is 7 plus 4?", "answer": "11"},  # ▁ 1 1 </s>: 4 loss tokens
    {
        "question": "How many?",
        "answer": "There are 9 cats on the table and 2 more in the box. "
        "If you have 1 keys and get 5 more, you hold a number of keys.",  # 36 loss tokens
    },
]
LAYOUTS = {  # name: (processes, per-device batch, gradient accumulation)
    "batch2": (1, 2, 1),
    "batch1-accum2": (1, 1, 2),
    "2ranks-batch1": (2, 1, 1),
}
LR = 0.5


def args(data: Path, out: Path, method: str, packing: str, batch: int, accum: int) -> list[str]:
    return [
        f"configs/{method}.yaml",
        f"output.dir={out}",
        f"data.path={data}",
        "data.eval_fraction=0",
        f"data.packing={packing}",
        f"training.per_device_train_batch_size={batch}",
        f"training.gradient_accumulation_steps={accum}",
        "training.max_steps=1",
        "training.optim=sgd",
        f"training.learning_rate={LR}",
        "training.lr_scheduler_type=constant",
        "training.warmup_ratio=0",
        "training.max_grad_norm=0",
        "lora.dropout=0",  # the same masks in every layout (configs/lora.yaml has 0.05)
        "training.weight_decay=0",
        "training.logging_steps=1",
        "training.report_to=[none]",
        "generation.samples=0",
        "output.merge=false",
    ]


def run_layout(data: Path, out: Path, method: str, packing: str, layout: str) -> None:
    procs, batch, accum = LAYOUTS[layout]
    cli = args(data, out, method, packing, batch, accum)
    if procs == 1:
        result = run_cli("finetune", *cli)
    else:
        env = launch_env(procs)
        result = subprocess.run(
            [str(REPO / "entrypoint" / "launch.sh"), *cli, "distributed.strategy=ddp"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=600,
        )
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]


def update(out: Path, method: str) -> torch.Tensor:
    """All trained parameters' change in the one step, flattened in name order."""
    if method == "lora":  # lora_B starts at zero and lora_A gets no gradient while B is zero
        final = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
        return torch.cat([final[k].flatten() for k in sorted(final) if "lora_B" in k])
    base = load_file(resolve_path("embedded:tiny-llama") + "/model.safetensors")
    final = load_file(out / "final" / "model" / "model.safetensors")
    return torch.cat([(final[k] - base[k]).flatten() for k in sorted(base)])


def logged(out: Path) -> tuple[float, float]:
    record = next(
        r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    )
    return record["loss"], record["loss_exact"][0]


@pytest.fixture(scope="module")
def token_mean(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The data file and the right loss: the base model's summed token loss / loss tokens,
    computed here from the prepared rows (LoRA's B is zero, so the step-1 model is the base)."""
    base = tmp_path_factory.mktemp("data")
    data = base / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = base / "prepare"
    result = run_cli(
        "prepare",
        "configs/full.yaml",
        f"data.path={data}",
        "data.eval_fraction=0",
        f"output.dir={out}",
        f"data.prepared_dir={base / 'prepared'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import datasets

    rows = datasets.load_from_disk(str(base / "prepared" / "train"))
    model = AutoModelForCausalLM.from_pretrained(resolve_path("embedded:tiny-llama"))
    total, tokens = 0.0, []
    for row in rows:
        labels = torch.tensor([row["labels"]])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        targets = labels[0, 1:]
        total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        tokens.append(int((targets != IGNORE_INDEX).sum()))
    assert sorted(tokens) == [4, 36]
    return data, total / sum(tokens)


@pytest.mark.parametrize("packing", ["none", "padding_free"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_layouts_give_the_token_mean_and_one_update(
    token_mean: tuple[Path, float], tmp_path: Path, method: str, packing: str
) -> None:
    data, expected = token_mean
    updates = {}
    for layout in LAYOUTS:
        out = tmp_path / layout
        run_layout(data, out, method, packing, layout)
        loss, exact = logged(out)
        assert exact == pytest.approx(expected, rel=1e-5), layout
        assert loss == pytest.approx(expected, abs=1e-4), layout  # the Trainer rounds to 4
        updates[layout] = update(out, method)
    reference = updates["batch2"]
    assert float(reference.norm()) > 0
    for layout, u in updates.items():
        rel = float((u - reference).norm() / reference.norm())
        assert rel < 1e-5, (layout, rel)
