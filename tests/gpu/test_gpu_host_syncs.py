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


def test_a_whole_row_training_step_never_syncs_the_host(tmp_path: Path) -> None:
    """data.packing=none with no padding, bf16 parameters, fp32 master weights, fused AdamW,
    clipping, Liger's loss: the step's forward, backward and optimizer step launch work without
    one host sync, so the host can run ahead of the GPU across steps (bench/RESULTS.md,
    2026-12-02). Each part that synced before: transformers 4.37.2's check of the all-ones
    mask (PadCollator omits it), find_segments (whole rows are taken as such), Liger's label
    count and gradient check (kernels/fused_linear_ce.py); the clip and the optimizer step run
    in kernels/master_adamw.py."""
    from llmtrain.kernels import loss as fused_loss
    from llmtrain.kernels import varlen_attention
    from llmtrain.train.master_weights import MasterWeights

    model = tiny_model("llama").cuda().to(torch.bfloat16).train()
    varlen_attention.patch_attention(model, packed=False)
    assert fused_loss.patch_causal_lm_loss(model)
    masters = MasterWeights(max_grad_norm=1e-3)  # small enough to clip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    masters.attach(optimizer)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 64), generator=g)
    rows = [{"input_ids": r, "labels": r} for r in ids.tolist()]
    batch = PadCollator(pad_token_id=0, omit_full_mask=True)(rows)
    assert "attention_mask" not in batch
    for debug in ("default", "default", "error"):  # two warm-up steps (cuDNN plans, Triton)
        moved = {k: v.pin_memory().cuda(non_blocking=True) for k, v in batch.items()}
        torch.cuda.set_sync_debug_mode(debug)
        try:
            loss = model(**moved, loss_reduction="sum").loss
            loss.backward()
            masters.accumulate()
            optimizer.step()
            optimizer.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # kernels/master_adamw.py stepped (a GPU with Triton), with the clip: the norm exceeded it
    assert masters.one_pass and masters.last_grad_norm is not None
    assert float(masters.last_grad_norm) > 1e-3
    assert "without host syncs" in fused_loss.liger_loss_function()[1]
