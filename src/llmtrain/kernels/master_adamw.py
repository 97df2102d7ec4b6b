"""AdamW on fp32 master weights and the bf16 copy in one pass (training.param_dtype=bfloat16).

torch's fused AdamW needs a gradient in its parameter's dtype, so train/master_weights.py first
copies each bf16 gradient into an fp32 one (6 bytes per parameter moved), the optimizer then
reads it (4) with the master and both moments and writes them back (24), and the bf16 parameter
is rewritten from the master (6): 40 bytes per parameter and step, plus the clip's norm. This
kernel reads the gradient as it is (bf16 after one micro-batch, fp32 once micro-batches were
summed), the master and the moments, and writes the master, the moments and the bf16 parameter:
28 bytes. On a 1.1B model that is 13 GB less memory traffic per step.

The update is torch's fused AdamW (aten/src/ATen/native/cuda/fused_adam_utils.cuh, ADAMW mode,
no amsgrad, no maximize): the gradient divided by `grad_scale` (the folded gradient clip), the
decoupled weight decay param *= 1 - lr * weight_decay (Loshchilov and Hutter 2019,
arXiv:1711.05101), the moments m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2 (Kingma and
Ba 2015, arXiv:1412.6980), then param -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps),
with t the step, counted on the host (the state's step tensor is never read: no sync). The bias
corrections, the step size and 1 - b come from the hyperparameters in double as torch's kernel
derives them; the tensors' arithmetic is fp32. The result agrees with torch's kernel to fp32
rounding, not bit for bit.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from llmtrain import compat

# Where the kernel was measured (bench/RESULTS.md, 2026-12-02); older torch ships older Triton.
MIN_TORCH = (2, 8)
_BLOCK = 2048


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_master(
        grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, param_ptr, scale_ptr, n,
        beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay, step_size,
        bias_correction2_sqrt, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        # IEEE square root and division (sqrt_rn, div_rn), as torch's kernel: Triton's `/`
        # and tl.sqrt are approximate on NVIDIA GPUs, and the kernel is memory-bound anyway.
        g = tl.div_rn(tl.load(grad_ptr + offs, mask=mask).to(tl.float32), tl.load(scale_ptr))
        p = tl.load(master_ptr + offs, mask=mask)
        m = tl.load(exp_avg_ptr + offs, mask=mask)
        v = tl.load(exp_avg_sq_ptr + offs, mask=mask)
        p = p - decay * p
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
        p = p - tl.div_rn(step_size * m, denom)
        tl.store(master_ptr + offs, p, mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
        tl.store(param_ptr + offs, p.to(param_ptr.dtype.element_ty), mask=mask)

    return adamw_master


@functools.cache
def unusable_here() -> str | None:
    """Why this process cannot run the kernel (no CUDA, torch older than MIN_TORCH, a Triton
    that does not import, or one that cannot compile and launch the kernel on this GPU), or
    None. Decided once per process, by one step of a single value."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not compat.at_least("torch", *MIN_TORCH):
        return f"torch {torch.__version__} is older than %d.%d" % MIN_TORCH
    try:
        kernel = _kernel()
        one = [torch.zeros(1, device="cuda") for _ in range(4)]
        kernel[(1,)](
            one[0], one[1], one[2], one[3], torch.zeros(1, device="cuda", dtype=torch.bfloat16),
            torch.ones((), device="cuda"), 1, BLOCK=_BLOCK,
            **_scalars({"betas": (0.9, 0.999), "lr": 1e-3, "eps": 1e-8, "weight_decay": 0.0}, 1),
        )  # fmt: skip
    except Exception as exc:  # ImportError, a driver Triton cannot load, a failed compile
        return f"Triton not usable ({type(exc).__name__}: {exc})"
    return None


def unusable_for(optimizer: torch.optim.Optimizer) -> str | None:
    """Why `optimizer` cannot be stepped by this kernel, or None: it must be torch's fused
    AdamW (the update it reproduces) without amsgrad, maximize, capturable or differentiable,
    with a float learning rate, over contiguous CUDA tensors."""
    if type(optimizer) is not torch.optim.AdamW:
        return f"the optimizer is {type(optimizer).__name__}, not torch.optim.AdamW"
    for group in optimizer.param_groups:
        if not group.get("fused"):
            return "the optimizer is not the fused AdamW (optim adamw_torch_fused)"
        if any(group.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable")):
            return "the optimizer uses amsgrad, maximize, capturable or differentiable"
        if not isinstance(group["lr"], float):
            return "the learning rate is a tensor"
        if not all(p.is_cuda and p.is_contiguous() for p in group["params"]):
            return "a parameter is not a contiguous CUDA tensor"
    return None


def _scalars(group: dict[str, Any], step: int) -> dict[str, float]:
    """The kernel's per-tensor constants, from the group's hyperparameters in double as torch's
    kernel derives them (its bias corrections are doubles from pow(beta, step), rounded to
    fp32 where they meet the tensors): computed in fp32 from fp32 betas, 1 - beta^t lost up to
    1.2e-4 of its value for beta2 = 0.999, and the update of every weight whose gradient is near
    eps moved by up to lr * 3e-5 (the first GPU test of this kernel)."""
    beta1, beta2 = group["betas"]
    lr = group["lr"]
    bias_correction1 = float(np.float32(1 - beta1**step))  # rounded to fp32, as torch's
    return {
        "beta1": beta1, "beta2": beta2, "one_minus_beta1": 1 - beta1,
        "one_minus_beta2": 1 - beta2, "eps": group["eps"],
        "decay": lr * group["weight_decay"], "step_size": lr / bias_correction1,
        "bias_correction2_sqrt": math.sqrt(1 - beta2**step),
    }  # fmt: skip


@torch.no_grad()
def step(
    optimizer: torch.optim.AdamW,
    masters: list[torch.Tensor],
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    grad_scale: torch.Tensor,
    steps: list[int],
) -> None:
    """One AdamW step of each master (fp32, an `optimizer` parameter) from its gradient (any
    float dtype, same shape), writing the master, its moments in `optimizer.state` (made as
    torch makes them on the first step, so state_dict and resume are torch's, the step count a
    tensor there too) and its 16-bit parameter. grad_scale: fp32 scalar on the device, every
    gradient is divided by it. steps: each master's step number after this one, as the host
    counts it (the state's step tensor is never read: no sync). The masters' own .grad is
    neither read nor changed. Callers check unusable_here and unusable_for first."""
    kernel = _kernel()
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    counts = []
    for master in masters:
        state = optimizer.state[master]
        if not state:  # torch's AdamW._init_group, fused
            state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
        counts.append(state["step"])
    torch._foreach_add_(counts, 1)
    scalars: dict[tuple[int, int], dict[str, float]] = {}  # per group and step number
    for master, grad, param, t in zip(masters, grads, params, steps, strict=True):
        state, group = optimizer.state[master], group_of[id(master)]
        key = (id(group), t)
        if key not in scalars:
            scalars[key] = _scalars(group, t)
        n = master.numel()
        kernel[(-(-n // _BLOCK),)](
            grad, master, state["exp_avg"], state["exp_avg_sq"], param, grad_scale, n,
            BLOCK=_BLOCK, **scalars[key],
        )  # fmt: skip
