"""Liger's fused linear cross-entropy against llmtrain's chunked loss on a CUDA GPU
(kernels/loss.py): the same loss and the same gradients of the hidden states and of lm_head's
weight (and bias), for reduction mean and sum, fp32 weights under bf16 autocast, bf16 weights and
fp32, a trained and a frozen lm_head, over two micro-batches whose scaled losses (as
loss_weighting scales the summed loss) accumulate into the gradients; the choice logged once; a
tiny random Llama patched as finetune patches it; the memory the estimator assumes for the loss.

Tolerance, stated: each path is compared with an fp64 computation from the same inputs (hidden
states, weights and biases as stored, upcast): losses within rtol 1e-3 (16-bit matmuls) or 1e-5
(fp32), gradients within 2e-2 (16-bit) or 1e-4 (fp32) relative Frobenius error, and the two
paths within the same bounds of each other. Skipped without CUDA; fails where Liger's loss cannot
run (liger-kernel or triton not importable, torch older than kernels/loss.LIGER_MIN_TORCH),
since the product then takes the chunks with only a log line.

    PYTHONPATH=$PWD/src:$PWD pytest -q -m gpu tests/gpu/test_gpu_liger_loss.py"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.kernels import loss as fused_loss
from llmtrain.labels import IGNORE_INDEX

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VOCAB, HIDDEN, BATCH, LENGTH = 1003, 128, 4, 96  # a vocabulary that is no power of two
# mode -> (weight dtype, autocast dtype or None, hidden-state dtype)
MODES = {
    "fp32-params-autocast": (torch.float32, torch.bfloat16, torch.float32),
    "bf16-params": (torch.bfloat16, None, torch.bfloat16),
    "fp32": (torch.float32, None, torch.float32),
}


@pytest.fixture(autouse=True)
def fresh_choice() -> Iterator[None]:
    fused_loss._ANNOUNCED.clear()
    yield
    fused_loss._ANNOUNCED.clear()


@pytest.fixture(scope="module")
def liger_version() -> str:
    function, why = fused_loss.liger_loss_function()
    assert function is not None, f"Liger's loss cannot run here: {why}"
    return why


def _batches() -> list[torch.Tensor]:
    """Two micro-batches of labels: prompts and padding ignored, 4 rows x 96."""
    g = torch.Generator().manual_seed(1)
    out = []
    for k in range(2):
        labels = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=g)
        labels[:, : 10 + 5 * k] = IGNORE_INDEX
        labels[1, 60:] = IGNORE_INDEX
        out.append(labels.cuda())
    return out


def _reference_loss(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, reduction: str
) -> torch.Tensor:
    """fp64 next-token cross-entropy from the same stored values."""
    bias = head.bias.double() if head.bias is not None else None
    logits = F.linear(hidden.double(), head.weight.double(), bias)
    targets = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )  # fmt: skip


def _run(
    path: str, mode: str, reduction: str, trained_head: bool, bias: bool
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor | None]]:
    """Both micro-batches' losses (forward under the mode's autocast, each scaled and backward
    outside it, as the Trainer does) and the accumulated gradients."""
    weight_dtype, autocast_dtype, hidden_dtype = MODES[mode]
    torch.manual_seed(0)
    head = nn.Linear(HIDDEN, VOCAB, bias=bias).cuda().to(weight_dtype)
    head.requires_grad_(trained_head)
    hidden = (torch.randn(BATCH, LENGTH, HIDDEN, device="cuda") * 2).to(hidden_dtype)
    hidden.requires_grad_()
    losses = []
    for labels, scale in zip(_batches(), (0.37, 1.0), strict=True):
        amp = (
            torch.autocast("cuda", dtype=autocast_dtype)
            if autocast_dtype
            else contextlib.nullcontext()
        )
        with amp:
            if path == "fp64":
                loss = _reference_loss(hidden, head, labels, reduction)
            elif path == "liger":
                assert fused_loss.liger_unusable(hidden, head) is None
                loss = fused_loss.lm_loss(hidden, head, labels, 256, reduction=reduction)
            else:
                loss = fused_loss.chunked_lm_loss(hidden, head, labels, 256, reduction=reduction)
        (loss * scale).backward()
        losses.append(loss.detach())
    grads = {"hidden": hidden.grad, "weight": head.weight.grad}
    if bias:
        grads["bias"] = head.bias.grad
    return losses, grads


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error; absolute where the reference is zero (LoRA's B starts at zero,
    so A's first gradient is zero)."""
    diff, norm = float((got.double() - want.double()).norm()), float(want.double().norm())
    return diff / norm if norm > 0 else diff


def every_case(test: Any) -> Any:
    """Each reduction, mode, trained or frozen lm_head, with and without a bias."""
    for mark in (
        pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"]),
        pytest.mark.parametrize("trained_head", [True, False], ids=["trained-head", "frozen-head"]),
        pytest.mark.parametrize("mode", list(MODES)),
        pytest.mark.parametrize("reduction", ["mean", "sum"]),
    ):
        test = mark(test)
    return test


@every_case
def test_liger_matches_the_chunks_and_fp64(
    liger_version: str, reduction: str, mode: str, trained_head: bool, bias: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    loss_tol, grad_tol = (1e-5, 1e-4) if mode == "fp32" else (1e-3, 2e-2)
    with caplog.at_level(logging.INFO, logger=fused_loss.__name__):
        liger = _run("liger", mode, reduction, trained_head, bias)
    chunks = _run("chunks", mode, reduction, trained_head, bias)
    exact = _run("fp64", mode, reduction, trained_head, bias)
    for name, (losses, grads) in {"liger": liger, "chunks": chunks}.items():
        for got, want in zip(losses, exact[0], strict=True):
            assert got.dtype == torch.float32, name
            assert float(got) == pytest.approx(float(want), rel=loss_tol), name
        for key, want in exact[1].items():
            got = grads[key]
            if want is None:  # the frozen lm_head: no gradient, none allocated into .grad
                assert got is None, (name, key)
                continue
            assert got is not None and got.dtype == want.dtype, (name, key)
            assert _rel(got, want) < grad_tol, (name, key, _rel(got, want))
    for key, got in liger[1].items():
        want = chunks[1][key]
        assert (got is None) == (want is None), key
        if got is not None and want is not None:
            assert _rel(got, want) < grad_tol, (key, _rel(got, want))
    chosen = f"chunked loss: Liger's fused linear cross-entropy ({liger_version})"
    messages = [r.getMessage() for r in caplog.records if r.name == fused_loss.__name__]
    assert messages == [chosen]  # two micro-batches, one line


def _tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH,
    )  # fmt: skip
    return LlamaForCausalLM(config).cuda().train()


@pytest.mark.parametrize("method", ["full", "lora", "lora-on-lm-head"])
def test_a_patched_tiny_llama_trains_the_same_through_liger(
    liger_version: str, method: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """finetune's patch on a tiny random Llama (fp32 weights, bf16 autocast, summed loss as
    loss_weighting asks for it): every trained parameter's gradient through Liger against the
    forced chunks. LoRA leaves lm_head frozen (Liger runs, lm_head gets no gradient); LoRA on
    lm_head wraps it, and the chunks run with the reason logged."""
    from peft import LoraConfig, get_peft_model

    results = []
    for force_chunks in (False, True):
        model = _tiny_llama()
        assert fused_loss.patch_causal_lm_loss(model)
        if method != "full":
            targets = ["q_proj", "v_proj"] + (["lm_head"] if method == "lora-on-lm-head" else [])
            model = get_peft_model(model, LoraConfig(r=4, target_modules=targets))
        with monkeypatch.context() as m:
            if force_chunks:
                m.setattr(fused_loss, "liger_unusable", lambda hidden, lm_head: "forced")
            with caplog.at_level(logging.INFO, logger=fused_loss.__name__):
                ids = torch.randint(3, VOCAB, (BATCH, LENGTH), device="cuda")
                labels = ids.clone()
                labels[:, :20] = IGNORE_INDEX
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=labels, loss_reduction="sum").loss
                (loss / 123.0).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        head = model.get_output_embeddings().weight
        results.append((loss.detach(), grads, head))
    (liger_loss, liger_grads, head), (chunk_loss, chunk_grads, _) = results
    assert liger_loss.dtype == torch.float32
    assert float(liger_loss) == pytest.approx(float(chunk_loss), rel=1e-3)
    assert liger_grads.keys() == chunk_grads.keys()
    for name, got in liger_grads.items():
        assert got is not None, name
        assert _rel(got, chunk_grads[name]) < 2e-2, (name, _rel(got, chunk_grads[name]))
    messages = [r.getMessage() for r in caplog.records if r.name == fused_loss.__name__]
    if method == "lora-on-lm-head":
        assert any(
            m.startswith("chunked loss: llmtrain's chunks, not Liger's fused loss: lm_head is a "
                         "peft.") for m in messages
        ), messages  # fmt: skip
    else:
        assert f"chunked loss: Liger's fused linear cross-entropy ({liger_version})" in messages
    if method == "lora":
        assert head.grad is None and not head.requires_grad


@pytest.mark.parametrize("mode", ["bf16-params", "fp32-params-autocast"])
def test_the_loss_memory_is_what_the_estimator_assumes(liger_version: str, mode: str) -> None:
    """fixed-1b-full's loss (8 x 2048 tokens, TinyLlama's 2048 x 32000 lm_head, trained): the
    peak of Liger's forward above its inputs against sizing/memory.py's Liger terms (the
    hidden states' gradient of activation_bytes, logits_bytes less the hidden states that are
    the input here), within 10%; and its chunk size against liger_chunk_tokens."""
    import triton

    from llmtrain.sizing.memory import (
        ModelShape,
        RunShape,
        _stream_bytes,
        liger_chunk_tokens,
        logits_bytes,
    )  # fmt: skip

    shape = ModelShape(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000)
    weight_dtype, autocast_dtype, hidden_dtype = MODES[mode]
    run = RunShape(
        method="full", micro_batch=8, seq_len=2048, padded=False, chunked_loss=True,
        liger_loss=True, weight_bytes=2 if weight_dtype == torch.bfloat16 else 4,
    )  # fmt: skip
    assert run.autocast == (autocast_dtype is not None)
    t, h, v = run.tokens, shape.hidden, shape.vocab
    assert liger_chunk_tokens(t, v, h) == triton.next_power_of_2(triton.cdiv(t, triton.cdiv(v, h)))
    predicted = logits_bytes(shape, run) - _stream_bytes(run) * t * h + run.dtype_bytes * t * h

    head = nn.Linear(h, v, bias=False).cuda().to(weight_dtype)
    hidden = torch.randn(8, 2048, h, device="cuda", dtype=hidden_dtype, requires_grad=True)
    labels = torch.randint(0, v, (8, 2048), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    amp = torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype else (
        contextlib.nullcontext()
    )  # fmt: skip
    with amp:
        loss = fused_loss.lm_loss(hidden, head, labels, 4194, reduction="sum")
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    assert measured == pytest.approx(predicted, rel=0.10), (measured / 2**20, predicted / 2**20)
    loss.backward()
    assert head.weight.grad is not None and hidden.grad is not None


@every_case
def test_the_sync_free_driver_matches_liger_public_function(
    liger_version: str, reduction: str, mode: str, trained_head: bool, bias: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """kernels/fused_linear_ce.py drives Liger's kernel as Liger's own forward does: the same
    losses and gradients as liger_kernel.functional.fused_linear_cross_entropy, bit for bit for
    "sum" (the same kernel, matmuls and one fp32 scaling by the incoming gradient), within
    16-bit rounding for "mean" (divided once after the sum, where Liger scales each row's
    gradient in its kernel)."""
    from liger_kernel.functional import fused_linear_cross_entropy

    from llmtrain.kernels import fused_linear_ce

    assert "without host syncs" in liger_version  # the lock's liger-kernel takes the driver
    loss_tol, grad_tol = (1e-6, 1e-5) if mode == "fp32" else (1e-5, 1e-2)
    if reduction == "sum":
        loss_tol = grad_tol = 0.0
    ours = _run("liger", mode, reduction, trained_head, bias)
    fused_loss.liger_loss_function.cache_clear()
    try:
        with monkeypatch.context() as m:  # another liger-kernel: its public function
            m.setattr(fused_loss.fused_linear_ce, "KERNEL_VERSION", "none")
            assert fused_loss.liger_loss_function()[0] is fused_linear_cross_entropy
            public = _run("liger", mode, reduction, trained_head, bias)
    finally:
        fused_loss.liger_loss_function.cache_clear()
    assert fused_loss.liger_loss_function()[0] is fused_linear_ce.fused_linear_cross_entropy
    for got, want in zip(ours[0], public[0], strict=True):
        assert float(got) == pytest.approx(float(want), rel=loss_tol)
    assert ours[1].keys() == public[1].keys()
    for key, want in public[1].items():
        got = ours[1][key]
        assert (got is None) == (want is None), key
        if got is not None and want is not None:
            assert got.dtype == want.dtype, key
            assert _rel(got, want) <= grad_tol, (key, _rel(got, want))


@pytest.mark.parametrize("mode", ["bf16-params", "fp32-params-autocast"])
def test_the_sync_free_driver_syncs_nothing(liger_version: str, mode: str) -> None:
    """Forward and backward under torch's sync debug mode "error": any host sync raises."""
    from llmtrain.kernels import fused_linear_ce

    weight_dtype, autocast_dtype, hidden_dtype = MODES[mode]
    head = nn.Linear(HIDDEN, VOCAB, bias=False).cuda().to(weight_dtype)
    hidden = torch.randn(BATCH * LENGTH, HIDDEN, device="cuda").to(autocast_dtype or hidden_dtype)
    hidden.requires_grad_()
    targets = _batches()[0].reshape(-1)
    for debug in ("default", "error"):  # the first call compiles the kernel
        torch.cuda.set_sync_debug_mode(debug)
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast_dtype is not None):
                (loss,) = fused_linear_ce.fused_linear_cross_entropy(
                    hidden, head.weight, targets, ignore_index=IGNORE_INDEX, reduction="mean"
                )
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert head.weight.grad is not None and hidden.grad is not None
