"""Training batches reach the GPU without a host sync (LlmtrainTrainer.get_train_dataloader and
_prepare_input): a blocking copy would let the GPU's queue run dry at every micro-batch
(bench/RESULTS.md, 2026-12-01: removing it and HF's NaN filter gave +4.7% tokens/s on
fixed-1b-full). torch's sync debug mode turns any synchronizing call into an error. Skipped
without CUDA."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from transformers import TrainingArguments

from llmtrain.data.collate import PadCollator
from llmtrain.train import loss_weighting
from llmtrain.train.trainer import LlmtrainTrainer, LossRecorder
from tests.tiny_models import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_a_training_batch_is_copied_to_the_gpu_without_a_host_sync(tmp_path: Path) -> None:
    rows = datasets.Dataset.from_dict(
        {"input_ids": [[5, 6, 7, 8]] * 4, "labels": [[-100, 6, 7, 8]] * 4}
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, report_to="none",
        remove_unused_columns=False,
    )  # fmt: skip
    trainer = LlmtrainTrainer(
        model=tiny_model("llama").cuda(),
        args=args,
        train_dataset=loss_weighting.StepTokenDataset(rows),
        data_collator=loss_weighting.StepTokenCollator(PadCollator(pad_token_id=0)),
        recorder=LossRecorder(),
        chunked_loss=False,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].device.type == "cpu" and batch["input_ids"].is_pinned()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moved = trainer._prepare_inputs(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert moved["input_ids"].is_cuda and moved["labels"].is_cuda
    assert torch.equal(moved["input_ids"].cpu(), batch["input_ids"])
