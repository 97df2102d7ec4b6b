"""DPO's step over two pairs laid out three ways through the real CLI: batch 2; batch 1 x
gradient accumulation 2; 2 gloo ranks x batch 1 under DDP (entrypoint/launch.sh with
torchrun). The step's loss is the mean over its pairs in every layout, so the logged loss and
the parameter update (plain SGD, no clipping: the update is the gradient) agree, for LoRA
(reference: the adapter disabled) and full weights (reference: a frozen copy)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli
from tests.strategies.test_cpu_strategies import launch_env
from tests.strategies.test_loss_weighting import LAYOUTS, update

pytestmark = pytest.mark.slow
PAIRS = [
    {"prompt": "What is 7 plus 4?", "chosen": "11", "rejected": "3"},
    {"prompt": "What is 2 plus 5?", "chosen": "7", "rejected": "There are 9 cats on the table."},
]


def run_layout(data: Path, out: Path, weights: str, layout: str) -> tuple[float, float]:
    procs, batch, accum = LAYOUTS[layout]
    cli = [
        "configs/dpo.yaml", f"output.dir={out}", f"data.path={data}", "data.eval_fraction=0",
        f"preference.weights={weights}", f"training.per_device_train_batch_size={batch}",
        f"training.gradient_accumulation_steps={accum}", "training.max_steps=2",
        "training.optim=sgd", "training.learning_rate=0.5", "training.lr_scheduler_type=constant",
        "training.warmup_ratio=0", "training.max_grad_norm=0", "training.weight_decay=0",
        "lora.dropout=0", "training.logging_steps=1", "training.report_to=[none]",
        "output.merge=false",
    ]
    if procs == 1:
        result = run_cli("finetune", *cli)
    else:
        result = subprocess.run(
            [str(REPO / "entrypoint" / "launch.sh"), *cli, "distributed.strategy=ddp"],
            capture_output=True, text=True, cwd=REPO, env=launch_env(procs), timeout=600,
        )
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-3000:]
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    exact = [r["loss_exact"][0] for r in steps if "loss_exact" in r]
    return exact[0], exact[1]


@pytest.mark.parametrize("weights", ["lora", "full"])
def test_layouts_give_the_pair_mean_and_one_update(tmp_path: Path, weights: str) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    results = {}
    for layout in LAYOUTS:
        out = tmp_path / layout
        results[layout] = (run_layout(data, out, weights, layout), update(out, weights))
    (first, second), reference_update = results["batch2"]
    # Step 1: the policy is the reference, every pair's loss is log 2. Step 2 differs per
    # pair, after an update that must be the same in every layout.
    assert abs(first - 0.6931472) < 1e-6
    assert reference_update.abs().max() > 0
    for layout, ((a, b), change) in results.items():
        assert abs(a - first) < 1e-6 and abs(b - second) < 1e-5, (layout, a, b, first, second)
        scale = reference_update.abs().max()
        assert (change - reference_update).abs().max() <= 1e-5 * scale, layout
    assert torch.isfinite(reference_update).all()
