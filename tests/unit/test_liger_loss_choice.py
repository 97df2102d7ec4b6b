"""Which loss the patched forward takes: Liger's fused linear cross-entropy only where it can run
(CUDA, liger_kernel and triton importable, a plain nn.Linear lm_head holding its whole weight),
llmtrain's chunks otherwise, with the reason logged once. On CPU a stand-in for Liger's function
checks what lm_loss hands it (tests/gpu/test_gpu_liger_loss.py runs the real one)."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.kernels import loss as fused_loss
from llmtrain.labels import IGNORE_INDEX

VOCAB, HIDDEN = 50, 16


@pytest.fixture(autouse=True)
def fresh_choice() -> Iterator[None]:
    """Each test decides (and logs) anew."""
    fused_loss.liger_loss_function.cache_clear()
    fused_loss._ANNOUNCED.clear()
    yield
    fused_loss.liger_loss_function.cache_clear()
    fused_loss._ANNOUNCED.clear()


def _reference_flce(
    flat: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ignore_index: int,
    reduction: str,
) -> tuple[torch.Tensor, None, None, None]:
    """What Liger's function computes, in plain torch (its signature as lm_loss calls it)."""
    # autocast's linear, where lm_loss gives 16-bit hidden states with fp32 weights
    logits = F.linear(flat, weight.to(flat.dtype), bias).float()
    return (
        F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction),
        None,
        None,
        None,
    )


@pytest.fixture
def liger_here(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Liger 'importable': liger_loss_function gives the stand-in, which records its calls."""
    calls: list[dict[str, Any]] = []

    def flce(
        flat: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, None, None, None]:
        calls.append({"flat": flat, "targets": targets, "bias": bias, **kwargs})
        return _reference_flce(flat, weight, targets, bias, **kwargs)

    monkeypatch.setattr(fused_loss, "liger_loss_function", lambda: (flce, "liger-kernel stand-in"))
    return calls


def _inputs(requires_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, HIDDEN, generator=g).requires_grad_(requires_grad)
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels[0, :4] = IGNORE_INDEX
    return hidden, labels


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == fused_loss.__name__]


def test_without_cuda_the_chunks_run_and_say_why_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden, labels = _inputs()
    assert fused_loss.liger_unusable(hidden, head) == "no CUDA device"
    with caplog.at_level(logging.INFO, logger=fused_loss.__name__):
        for _ in range(2):
            got = fused_loss.lm_loss(hidden, head, labels, chunk_tokens=4)
    want = fused_loss.chunked_lm_loss(hidden, head, labels, chunk_tokens=4)
    torch.testing.assert_close(got, want)
    assert _messages(caplog) == [
        "chunked loss: llmtrain's chunks, not Liger's fused loss: no CUDA device"
    ]


@pytest.mark.parametrize("missing", ["liger_kernel", "triton"])
def test_without_liger_or_triton_the_chunks_run(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    """The current stack's CPU venv has liger-kernel but no triton; a GPU base could lack either."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
    if missing == "liger_kernel":  # triton imports, liger_kernel does not
        monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    function, why = fused_loss.liger_loss_function()
    assert function is None
    assert why.startswith("liger-kernel not usable (ModuleNotFoundError") and missing in why
    assert fused_loss.liger_unusable(torch.zeros(1, HIDDEN), nn.Linear(HIDDEN, VOCAB)) == why


def test_the_patched_model_logs_at_patch_time_when_liger_cannot_run_in_this_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with caplog.at_level(logging.INFO, logger=fused_loss.__name__):
        assert fused_loss.patch_causal_lm_loss(model)
    assert "chunked loss: llmtrain's chunks, not Liger's fused loss: no CUDA device" in (
        _messages(caplog)
    )


def test_a_lora_wrapped_lm_head_takes_the_chunks(liger_here: list[dict[str, Any]]) -> None:
    from peft import LoraConfig, get_peft_model

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)

    wrapped = get_peft_model(Head(), LoraConfig(r=2, target_modules=["lm_head"]))  # type: ignore[arg-type]
    head = wrapped.base_model.model.lm_head
    hidden, labels = _inputs()
    why = fused_loss.liger_unusable(hidden, head)
    assert why is not None and why.startswith("lm_head is a peft.") and "Linear" in why
    fused_loss.lm_loss(hidden, head, labels, chunk_tokens=4)
    assert liger_here == []


@pytest.mark.parametrize(
    "weight, expected",
    [
        (torch.empty(0), "lm_head.weight has shape (0,), not [vocab, hidden] = [50, 16]"),
        (torch.empty(25, HIDDEN), "lm_head.weight has shape (25, 16), not [vocab, hidden]"),
    ],
    ids=["zero3-empty", "row-shard"],
)
def test_a_weight_that_is_not_whole_at_the_call_takes_the_chunks(
    liger_here: list[dict[str, Any]], weight: torch.Tensor, expected: str
) -> None:
    """ZeRO-3 leaves an empty tensor outside the module's call; FSDP may leave a shard."""
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    head.weight = nn.Parameter(weight)
    why = fused_loss.liger_unusable(torch.zeros(3, HIDDEN), head)
    assert why is not None and why.startswith(expected)


def test_hooks_and_tensor_subclasses_and_cpu_tensors_take_the_chunks(
    liger_here: list[dict[str, Any]],
) -> None:
    hidden = torch.zeros(3, HIDDEN, requires_grad=True)
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    handle = head.register_forward_pre_hook(lambda module, args: None)
    assert "forward hooks" in str(fused_loss.liger_unusable(hidden, head))
    handle.remove()

    class Sharded(nn.Parameter):
        pass

    head.weight = Sharded(torch.zeros(VOCAB, HIDDEN))
    assert "is a Sharded, not a plain tensor" in str(fused_loss.liger_unusable(hidden, head))
    head.weight = nn.Parameter(torch.zeros(VOCAB, HIDDEN))
    assert fused_loss.liger_unusable(hidden, head) == (
        "hidden states on cpu, lm_head.weight on cpu"
    )


def test_a_trained_lm_head_over_hidden_states_without_gradient_takes_the_chunks(
    monkeypatch: pytest.MonkeyPatch, liger_here: list[dict[str, Any]]
) -> None:
    """Liger 0.8.5 computes no weight gradient when its input needs none."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    frozen_decoder = torch.zeros(3, HIDDEN)
    assert "hidden states need no gradient" in str(fused_loss.liger_unusable(frozen_decoder, head))
    head.requires_grad_(False)  # nothing trains here: Liger computes the loss alone
    assert fused_loss.liger_unusable(frozen_decoder, head) is None
    with torch.no_grad():
        assert "gradients are off" in str(fused_loss.liger_unusable(frozen_decoder, head))
    head.requires_grad_(True)
    assert fused_loss.liger_unusable(frozen_decoder.requires_grad_(), head) is None


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_liger_gets_shifted_targets_and_the_reduction_and_matches_the_chunks(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    liger_here: list[dict[str, Any]],
    reduction: str,
    bias: bool,
) -> None:
    monkeypatch.setattr(fused_loss, "liger_unusable", lambda hidden, lm_head: None)
    torch.manual_seed(0)
    head = nn.Linear(HIDDEN, VOCAB, bias=bias)
    hidden, labels = _inputs()
    with caplog.at_level(logging.INFO, logger=fused_loss.__name__):
        got = fused_loss.lm_loss(hidden, head, labels, chunk_tokens=4, reduction=reduction)
        fused_loss.lm_loss(hidden, head, labels, chunk_tokens=4, reduction=reduction)
    (call, _) = liger_here
    assert call["flat"].shape == (18, HIDDEN) and call["targets"].shape == (18,)
    assert call["targets"].view(2, 9)[:, :-1].tolist() == labels[:, 1:].tolist()
    assert call["targets"].view(2, 9)[:, -1].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    assert call["ignore_index"] == IGNORE_INDEX and call["reduction"] == reduction
    assert (call["bias"] is not None) == bias
    assert _messages(caplog) == [
        "chunked loss: Liger's fused linear cross-entropy (liger-kernel stand-in)"
    ]
    want = fused_loss.chunked_lm_loss(hidden, head, labels, chunk_tokens=4, reduction=reduction)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="loss reduction 'none'"):
        fused_loss.lm_loss(hidden, head, labels, chunk_tokens=4, reduction="none")


def test_under_autocast_the_hidden_states_go_in_the_matmul_dtype(
    monkeypatch: pytest.MonkeyPatch, liger_here: list[dict[str, Any]]
) -> None:
    """fp32 weights under bf16 autocast: hidden states and bias cast to bf16, as autocast's
    linear casts them; the weight passes as it is (its gradient accumulates in fp32)."""
    monkeypatch.setattr(fused_loss.fused_ops, "autocast_dtype", lambda kind: torch.bfloat16)
    head = nn.Linear(HIDDEN, VOCAB, bias=True)
    hidden, labels = _inputs()
    fused_loss.liger_lm_loss(hidden, head, labels)
    monkeypatch.setattr(fused_loss.fused_ops, "autocast_dtype", lambda kind: None)
    fused_loss.liger_lm_loss(hidden.detach().bfloat16(), head.bfloat16(), labels)
    under_autocast, bf16_params = liger_here
    assert under_autocast["flat"].dtype == torch.bfloat16
    assert under_autocast["bias"].dtype == torch.bfloat16
    assert bf16_params["flat"].dtype == torch.bfloat16


def test_torch_older_than_the_minimum_takes_the_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """NGC 24.04's torch 2.3 has no torch.addmm out_dtype: Liger's fp32 weight gradients would
    go through weight-sized temporaries there."""
    # NGC's version string is read as its release (tests/unit/test_compat.py: (2, 3, 0)).
    installed = fused_loss.compat.installed
    monkeypatch.setattr(
        fused_loss.compat, "installed", lambda d: (2, 3, 0) if d == "torch" else installed(d)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "__version__", "2.3.0a0+6ddf5cf")
    assert fused_loss.liger_loss_function() == (
        None,
        "torch 2.3.0a0+6ddf5cf is older than 2.8",
    )
