"""kernels/fused_linear_ce.py against liger-kernel 0.8.5's own function, on the CPU.

The Triton kernel runs only on a GPU (tests/gpu/test_gpu_liger_loss.py compares the two there):
here the backward is called directly, and the forward's chunk loop is driven with a stand-in for
`liger_cross_entropy_kernel` (a torch implementation of what the kernel writes: each row's loss,
and in place of its logits their gradient)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch

from llmtrain.kernels import fused_linear_ce
from llmtrain.kernels.fused_linear_ce import FusedLinearCrossEntropySum


class _Ctx:
    _fwd_used_autocast = False
    _dtype = torch.bfloat16

    def __init__(self, *saved: torch.Tensor | None) -> None:
        self.saved_tensors = saved


@pytest.mark.parametrize("step_tokens", [777, 3000, 12288])
def test_backward_scales_the_saved_gradients_with_one_rounding_as_liger(step_tokens: int) -> None:
    """Liger 0.8.5's backward (element_mul_kernel) loads grad_output as fp32 and stores
    X * grad_output: one rounding to X's dtype. fused_linear_ce first rounds grad_output
    (loss_weighting's 1 / step tokens, accelerate's 1 / accumulation) to the gradient's dtype
    must not happen: in bf16 every hidden-state gradient would be off by the same up-to-0.39%
    factor, while an fp32 lm_head weight gradient (fp32 params under autocast) kept the exact
    scale. (On the CPU a 0-dim fp32 factor multiplies as a scalar either way; the GPU's
    TensorIterator rounds it to the tensor's dtype first, so the product is spelled out.)"""
    g = torch.Generator().manual_seed(0)
    grad_hidden = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    grad_weight = torch.randn(100, 32, generator=g)
    grad_output = torch.tensor(1.0 / step_tokens)
    got_hidden, got_weight, _, _, _ = FusedLinearCrossEntropySum.backward(
        _Ctx(grad_hidden.clone(), grad_weight.clone(), None), grad_output
    )
    liger_hidden = (grad_hidden.float() * grad_output).to(torch.bfloat16)
    liger_weight = grad_weight * grad_output
    torch.testing.assert_close(got_weight, liger_weight, rtol=0, atol=0)
    torch.testing.assert_close(got_hidden, liger_hidden, rtol=0, atol=0)


def _fake_kernel(monkeypatch: pytest.MonkeyPatch, seen: list[torch.dtype]) -> None:
    triton = types.ModuleType("triton")
    triton.next_power_of_2 = lambda n: 1 << (int(n) - 1).bit_length()  # type: ignore[attr-defined]
    triton.cdiv = lambda a, b: -(-a // b)  # type: ignore[attr-defined]

    class Kernel:
        def __getitem__(self, grid: tuple[int]) -> Any:
            def run(**kw: Any) -> None:
                x, y, loss = kw["X_ptr"], kw["Y_ptr"], kw["loss_ptr"]
                seen.append(x.dtype)
                keep = y != kw["ignore_index"]
                xf = x.float()
                yy = y.clamp(min=0)
                loss[keep] = (torch.logsumexp(xf, -1) - xf.gather(1, yy[:, None])[:, 0])[keep]
                grad = torch.softmax(xf, -1)
                grad[torch.arange(len(y)), yy] -= 1
                grad[~keep] = 0
                x.copy_(grad)

            return run

    ce = types.ModuleType("liger_kernel.ops.cross_entropy")
    ce.liger_cross_entropy_kernel = Kernel()  # type: ignore[attr-defined]
    for name, mod in {
        "triton": triton,
        "liger_kernel": types.ModuleType("liger_kernel"),
        "liger_kernel.ops": types.ModuleType("liger_kernel.ops"),
        "liger_kernel.ops.cross_entropy": ce,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)


def test_fp32_operands_under_autocast_get_autocast_logits_as_liger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Liger 0.8.5 uses mm(out=) only when the operands' dtype is autocast's
    (_can_use_mm_out); fp32 hidden states and an fp32 weight under bf16 autocast take `@`, so
    autocast runs the matmul in bf16 and the kernel reads bf16 logits. mm(out=) for any shared
    dtype would skip autocast: fp32 logits, an fp32 matmul (and a [chunk, vocab] fp32 buffer).
    (kernels/loss.py casts the hidden states to autocast's dtype first, so finetune does not
    reach this; a direct caller does.) The CPU's autocast stands in for CUDA's."""
    seen: list[torch.dtype] = []
    _fake_kernel(monkeypatch, seen)
    hidden = torch.randn(40, 16, requires_grad=True)
    weight = torch.randn(100, 16)  # frozen: addmm(out_dtype=) has no CPU kernel
    targets = torch.randint(0, 100, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (hidden[:2] @ weight.t()).dtype == torch.bfloat16  # what `@` gives here
        fused_linear_ce.fused_linear_cross_entropy(
            hidden, weight, targets, ignore_index=-100, reduction="sum"
        )
    assert seen and set(seen) == {torch.bfloat16}
