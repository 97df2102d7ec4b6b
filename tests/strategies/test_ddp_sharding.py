"""The training DataLoader as LlmtrainTrainer builds it, over 2 gloo ranks on CPU (torchrun):
the samples of each optimizer step, over all ranks and micro-batches, must be exactly the block
StepTokenSampler counted that step's loss tokens over (loss_weighting's assumption), on either
stack. accelerate 1.x counts a CPU process as one of torchrun's world only when the Trainer
runs with use_cpu; without it every rank read all the samples and trained alone.

No training: one epoch of the loader, rows told apart by their first token. This file is also
the probe that torchrun runs on each rank.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

BATCH, ACCUMULATION, RANKS = 2, 2, 2
ROWS = 11  # two optimizer steps of 8 samples, the second with 5 fillers
FIRST_ID = 3  # row i: input ids FIRST_ID + i, 2 + i tokens, 1 + i loss tokens


def probe(out: Path) -> None:
    """One rank: its micro-batches' rows and step counts, written to out/rank<r>.json."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    from llmtrain.config import load_config, resolve_path
    from llmtrain.data.collate import PadCollator
    from llmtrain.labels import IGNORE_INDEX
    from llmtrain.plan import World
    from llmtrain.train import loss_weighting
    from llmtrain.train.run import plan_run, training_arguments
    from llmtrain.train.trainer import LlmtrainTrainer, LossRecorder

    repo = Path(__file__).resolve().parents[2]
    world = World.from_env()
    cfg = load_config(
        repo / "configs" / "full.yaml",
        [
            f"output.dir={out}",
            f"training.per_device_train_batch_size={BATCH}",
            f"training.gradient_accumulation_steps={ACCUMULATION}",
            "training.report_to=[none]",
            "distributed.strategy=ddp",
        ],
    )
    args = training_arguments(cfg, world, plan_run(cfg, world), out, False, None)
    ids = [[FIRST_ID + i] * (2 + i) for i in range(ROWS)]
    base = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    trainer = LlmtrainTrainer(
        model=AutoModelForCausalLM.from_pretrained(resolve_path(cfg.model.path)),
        args=args,
        train_dataset=loss_weighting.StepTokenDataset(base),
        data_collator=loss_weighting.StepTokenCollator(PadCollator(pad_token_id=0)),
        recorder=LossRecorder(),
        chunked_loss=False,
    )
    batches: list[dict[str, Any]] = []
    for batch in trainer.get_train_dataloader():
        trained = (batch["labels"][:, 1:] != IGNORE_INDEX).any(dim=1)
        rows = torch.where(trained, batch["input_ids"][:, 0] - FIRST_ID, loss_weighting.FILLER)
        batches.append({"rows": rows.tolist(), "step_tokens": batch[loss_weighting.STEP_TOKENS]})
    (out / f"rank{world.rank}.json").write_text(json.dumps(batches))


def test_each_step_reads_the_samples_it_was_counted_over(tmp_path: Path) -> None:
    import numpy as np

    from llmtrain.config import load_config
    from llmtrain.train.loss_weighting import FILLER, StepTokenSampler
    from tests.conftest import REPO
    from tests.strategies.test_cpu_strategies import torchrun

    torchrun(__file__, tmp_path, RANKS)

    seed = load_config(REPO / "configs" / "full.yaml").training.seed
    step_samples = BATCH * RANKS * ACCUMULATION
    counts = np.arange(1, ROWS + 1, dtype=np.int64)
    order = [item.row for item in StepTokenSampler(counts, seed, step_samples)]
    blocks = [order[s : s + step_samples] for s in range(0, len(order), step_samples)]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(RANKS)]
    assert all(len(batches) == len(blocks) * ACCUMULATION for batches in ranks)
    for step, block in enumerate(blocks):
        micro = [b for batches in ranks for b in batches[step * ACCUMULATION :][:ACCUMULATION]]
        assert sorted(r for b in micro for r in b["rows"]) == sorted(block), step
        tokens = sum(int(counts[r]) for r in block if r != FILLER)
        assert {b["step_tokens"] for b in micro} == {tokens}, step


if __name__ == "__main__":
    probe(Path(sys.argv[1]))
