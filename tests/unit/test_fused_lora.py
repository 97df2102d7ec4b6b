"""The fused LoRA linear computes what peft's LoRA Linear does (0.9.0 on the pinned stack, 0.2x on
the current one), forward and backward, and leaves every case it does not handle to peft."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from llmtrain import stack
from llmtrain.kernels import lora as fused_lora
from tests.tiny_models import tiny_model


def lora_linear(base: nn.Module, r: int = 4, lora_alpha: int = 8, **options: Any) -> LoraLinear:
    """peft's LoRA Linear around `base` with adapter "default"; `options` are LoraConfig keys."""
    if stack.is_current():  # peft 0.2x reads every option but r and alpha from a LoraConfig
        config = LoraConfig(r=r, lora_alpha=lora_alpha, **options)
        return LoraLinear(base, "default", config=config, r=r, lora_alpha=lora_alpha)
    return LoraLinear(base, "default", r=r, lora_alpha=lora_alpha, **options)


def lora_layer(dropout: float = 0.0, bias: bool = True) -> LoraLinear:
    torch.manual_seed(0)
    layer = lora_linear(nn.Linear(16, 12, bias=bias), lora_dropout=dropout)
    layer.base_layer.weight.requires_grad_(False)
    nn.init.normal_(layer.lora_B["default"].weight)  # peft starts B at zero: no signal to compare
    return layer


def forward_backward(layer: nn.Module, x: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout mask on both sides
    out = layer(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    return {"out": out.detach(), "x.grad": x.grad, **grads}


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_peft_forward_and_gradients(dropout: float) -> None:
    reference = lora_layer(dropout)
    reference.base_layer.bias.requires_grad_(True)  # its gradient path too
    layer = copy.deepcopy(reference)
    assert fused_lora.patch(layer) == 1
    x = torch.randn(3, 5, 16)
    want, got = forward_backward(reference, x), forward_backward(layer, x)
    assert (
        set(got)
        == set(want)
        == {"out", "x.grad", "base_layer.bias", "lora_A.default.weight", "lora_B.default.weight"}
    )
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)


def test_under_autocast_matches_peft_with_fp32_adapters() -> None:
    """bf16 base, fp32 adapter weights, autocast bf16: what llmtrain trains LoRA with."""
    reference = lora_layer(bias=False)
    reference.base_layer.to(torch.bfloat16)
    layer = copy.deepcopy(reference)
    fused_lora.patch(layer)
    x = torch.randn(2, 7, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = forward_backward(reference, x), forward_backward(layer, x)
    assert got["out"].dtype == torch.bfloat16
    assert got["lora_A.default.weight"].dtype == torch.float32
    for key in want:  # peft rounds the adapter product and the sum separately; this once
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=2e-2, atol=2e-2)


def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time the fused function runs."""
    calls: list[int] = []
    apply = fused_lora._LoraLinear.apply
    monkeypatch.setattr(fused_lora._LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


def test_disabled_merged_or_trained_base_take_peft_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fused_calls(monkeypatch)
    layer = lora_layer()
    fused_lora.patch(layer)
    x = torch.randn(2, 16)
    layer(x)
    assert calls == [1]
    layer.base_layer.weight.requires_grad_(True)  # its gradient is not computed here
    layer(x)
    layer.base_layer.weight.requires_grad_(False)
    layer.merge()
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    layer.unmerge()
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    assert calls == [1]


def with_lora_b_bias() -> LoraLinear:
    layer = lora_layer()
    layer.lora_B["default"].bias = nn.Parameter(torch.randn(12))  # what lora_bias=True adds
    return layer


def with_hooked_base() -> LoraLinear:
    layer = lora_layer()
    layer.base_layer.register_forward_hook(lambda module, args, out: 2 * out)
    return layer


def with_mixed_dtypes() -> LoraLinear:
    layer = lora_layer()
    layer.base_layer.to(torch.bfloat16)  # the adapter stays fp32 and autocast is off
    return layer


def with_alora() -> LoraLinear:
    """peft 0.2x's aLoRA: a `lora_variant` whose term, without invocation offsets, is zero."""
    torch.manual_seed(0)
    layer = lora_linear(nn.Linear(16, 12), alora_invocation_tokens=[1], task_type="CAUSAL_LM")
    layer.base_layer.weight.requires_grad_(False)
    nn.init.normal_(layer.lora_B["default"].weight)
    return layer


@pytest.mark.parametrize(
    "build",
    [
        with_lora_b_bias,
        with_hooked_base,
        with_mixed_dtypes,
        pytest.param(
            with_alora,
            marks=pytest.mark.skipif(not stack.is_current(), reason="peft 0.9.0 has no variants"),
        ),
    ],
)
def test_what_the_fused_function_cannot_compute_takes_peft_forward(
    build: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = fused_calls(monkeypatch)
    reference = build()
    layer = copy.deepcopy(reference)
    assert fused_lora.patch(layer) == 1
    x = torch.randn(3, 5, 16, dtype=layer.base_layer.weight.dtype)
    want, got = forward_backward(reference, x), forward_backward(layer, x)
    assert calls == []
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


def test_patches_every_adapted_layer_of_a_peft_model_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = get_peft_model(
        tiny_model("llama"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    layers = model.base_model.model.config.num_hidden_layers
    assert fused_lora.patch(model) == 2 * layers
    assert fused_lora.patch(model) == 0
    calls = fused_calls(monkeypatch)
    ids = torch.randint(0, 128, (2, 9))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert len(calls) == 2 * layers  # nothing in the model's own call sends them back to peft
