"""Liger's fused linear cross-entropy, summed, without a host sync.

liger-kernel 0.8.5's `fused_linear_cross_entropy` synchronizes the host with the GPU three times
per call: its forward reads the number of label tokens with `.item()` (it needs it only for the
"mean" reduction), and its backward builds `torch.tensor(1.0)` on the GPU and compares the
incoming gradient with it (`torch.equal`) to skip a multiply. Each sync empties the GPU's queue,
so the host loses the lead it had built over the GPU; with a whole-row step otherwise free of
syncs, the Trainer's host work between optimizer steps (the next batch, the learning rate, the
callbacks) then runs while the GPU waits (bench/RESULTS.md, 2026-12-02).

This module drives the same Triton kernel (`liger_kernel.ops.cross_entropy.
liger_cross_entropy_kernel`, Hsu et al. 2024, arXiv:2410.10989) through the same chunked loop
as Liger's forward, for the only case llmtrain's training loss needs (hard labels, "sum"
reduction, no class weights, soft cap, z-loss or label smoothing), and returns the sum as a GPU
scalar: the caller divides by a label count that stays on the GPU. The backward always
multiplies the stored gradients by the incoming one, in place, in fp32 and rounded once as
Liger's own backward does (a pass over [tokens, hidden] and [vocab, hidden], far cheaper than a
sync).

The kernel's keyword arguments are those of liger-kernel KERNEL_VERSION (read in its
ops/cross_entropy.py and ops/fused_linear_cross_entropy.py); kernels/loss.py takes this path
only with that version installed, else Liger's public function.
"""

from __future__ import annotations

from typing import Any

import torch

KERNEL_VERSION = "0.8.5"
# Liger's bound on one chunk's logits (ops/fused_linear_cross_entropy.py MAX_FUSED_SIZE, the
# kernel's widest block of the vocabulary on a GPU).
_MAX_BLOCK = 65536 // 2
_SCALE_ELEMENTS = 1 << 24  # the fp32 copy _scale_ makes of a 16-bit gradient, at most 64 MiB


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor,
                            hidden: torch.Tensor) -> None:
    """grad_weight [V, H] += grad_logits.T [V, chunk] @ hidden [chunk, H], summing in
    grad_weight's dtype: fp32 for fp32 weights under autocast (addmm's out_dtype, as Liger), the
    weight's own 16-bit dtype for 16-bit weights."""
    hidden = hidden.to(grad_logits.dtype)
    if grad_weight.dtype == grad_logits.dtype:
        torch.addmm(grad_weight, grad_logits.t(), hidden, out=grad_weight)
    elif grad_weight.dtype == torch.float32:
        torch.addmm(grad_weight, grad_logits.t(), hidden, out_dtype=torch.float32,
                    out=grad_weight)
    else:
        grad_weight += (grad_logits.t() @ hidden).to(grad_weight.dtype)


class FusedLinearCrossEntropySum(torch.autograd.Function):
    """sum over label tokens of cross_entropy(hidden @ weight.T + bias, targets), fp32 scalar on
    the GPU, with the gradients of hidden, weight and bias computed in the forward pass.

    forward(hidden [T, H] in the matmul's dtype (autocast's under autocast), weight [V, H],
    targets int64 [T], bias [V] or None, ignore_index: the target that takes no loss).
    Gradients: hidden's in its dtype, weight's and bias's in their own; none for a weight or
    bias that needs none. The backward scales the stored gradients in place, so it may run
    once per forward (no retain_graph double backward), as Liger's."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
        import triton
        from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

        tokens, width = hidden.shape
        vocab = weight.shape[0]
        # Liger's chunking: [chunk, V] logits no larger than [T, H].
        chunk = min(tokens, triton.next_power_of_2(triton.cdiv(tokens, triton.cdiv(vocab, width))))
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if weight.requires_grad else None
        grad_bias = (torch.zeros_like(bias) if bias is not None and bias.requires_grad
                     else None)
        losses = torch.zeros(tokens, dtype=torch.float32, device=hidden.device)
        block = min(_MAX_BLOCK, triton.next_power_of_2(vocab))
        # One logits buffer for every chunk where the matmul's operands are already in the
        # dtype it runs in (out= skips autocast; Liger's _can_use_mm_out); else `@`, which
        # autocast casts (an fp32 weight per chunk, as nn.Linear would).
        kind = hidden.device.type
        same = weight.dtype == hidden.dtype and (
            not torch.is_autocast_enabled(kind) or hidden.dtype == torch.get_autocast_dtype(kind)
        )
        buffer = (torch.empty((chunk, vocab), dtype=hidden.dtype, device=hidden.device)
                  if same else None)
        for start in range(0, tokens, chunk):
            end = min(start + chunk, tokens)
            piece = hidden[start:end]
            if buffer is not None:
                logits = torch.mm(piece, weight.t(), out=buffer[: end - start])
            else:
                logits = (piece @ weight.t()).contiguous()
            if bias is not None:
                logits += bias
            rows = targets[start:end].contiguous()
            out = losses[start:end]
            # The kernel writes each row's loss and, in place of its logits, their gradient.
            liger_cross_entropy_kernel[(end - start,)](
                X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=rows, Y_stride=rows.stride(-1),
                weight_ptr=None, loss_ptr=out, z_loss_ptr=None, loss_stride=out.stride(-1),
                token_accuracy_ptr=None, token_accuracy_stride=0,
                predicted_tokens_ptr=None, predicted_tokens_stride=0,
                n_cols=vocab, n_non_ignore=1, sum_non_ignore_weight=1, weight_sum=0.0,
                ignore_index=ignore_index, lse_square_scale=0.0, label_smoothing=0.0,
                reduction="sum", softcap=None, RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False,
                RETURN_PREDICTED_TOKENS=False, HAS_WEIGHT=False, HAS_SOFTCAPPING=False,
                HAS_GRADIENTS=True, BLOCK_SIZE=block, num_warps=32,
            )  # fmt: skip
            if same:
                torch.mm(logits, weight, out=grad_hidden[start:end])
            else:
                grad_hidden[start:end] = logits @ weight
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, logits, piece)
            if grad_bias is not None:
                # Under autocast `sum` runs in fp32 (an autocast fp32 op): added without a cast,
                # it is rounded to 16 bits once, in the add, as Liger's torch.add(out=).
                grad_bias.add_(logits.sum(dim=0))
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return losses.sum()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        for grad in (grad_hidden, grad_weight, grad_bias):
            if grad is not None:
                _scale_(grad, grad_output)
        return grad_hidden, grad_weight, None, grad_bias, None


def _scale_(grad: torch.Tensor, factor: torch.Tensor) -> None:
    """grad [rows, ...] *= factor (an fp32 scalar tensor on grad's device) in fp32, rounded once
    to grad's dtype, as Liger's element_mul_kernel does. A 16-bit `grad.mul_(factor)` would
    first round the factor (loss_weighting's 1 / step tokens) to 16 bits on a GPU, one shared
    error of up to 0.4% in every gradient of the decoder. 16-bit gradients go through an fp32
    copy of at most _SCALE_ELEMENTS values at a time."""
    if grad.dtype == torch.float32:
        grad.mul_(factor)
        return
    for piece in grad.split(max(1, _SCALE_ELEMENTS // grad[0].numel())):
        piece.copy_(piece.float().mul_(factor))


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int,
    reduction: str,
) -> tuple[torch.Tensor]:
    """`liger_kernel.functional.fused_linear_cross_entropy`'s call, as kernels/loss.py makes it,
    without a host sync: the loss (fp32 scalar on the GPU, in a 1-tuple as Liger's first
    output), summed over the label tokens ("sum") or divided by their number ("mean", a count
    that stays on the GPU; NaN for a batch without labels, as the chunked loss gives).
    kernels/loss.py has refused any other reduction before the call."""
    total: torch.Tensor = FusedLinearCrossEntropySum.apply(hidden, weight, targets, bias,
                                                           ignore_index)
    if reduction == "sum":
        return (total,)
    return (total / (targets != ignore_index).sum(),)
