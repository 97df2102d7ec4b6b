"""A LoRA linear layer's base and adapter matmuls as one autograd function.

peft (0.9.0 on the pinned stack, 0.2x on the current one) computes
`base(x) + lora_B(lora_A(dropout(x.to(A.dtype)))) * scaling` for a plain adapter. With the fp32
adapter weights llmtrain trains, that casts every activation to fp32 and back to bf16 (and its
gradient the same way), then scales, adds, and in the backward adds the two input gradients:
each one more pass over a [tokens, features] tensor, in every adapted layer. Here the adapter
product is accumulated into the base output inside the matmul (addmm, beta 1), and its input
gradient into the base's the same way, so what LoRA adds is its two rank-r matmuls each way.
The arithmetic is autocast's (matmuls in its dtype, fp32 accumulation) with fewer roundings.

Used where every weight is whole on the GPU when the layer runs (one GPU, DDP, ZeRO-2: the
`fused_lora` column of plan.STRATEGIES); under FSDP and ZeRO-3 the sub-modules' own forward
hooks gather the weights, so peft's forward stays.
Anything else peft's layer can do takes peft's forward, decided per call by `_adapter`: several
or mixed adapters (`adapter_names`), any other keyword (aLoRA's `alora_offsets`), merged or
disabled adapters, DoRA and peft 0.2x's other `lora_variant`s, a bias on lora_B (`lora_bias`), a
quantized or hooked base, and mixed dtypes without autocast. rsLoRA is only another `scaling`,
which the fused function reads from the layer.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

from llmtrain.kernels.ops import autocast_dtype

log = logging.getLogger(__name__)


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + bias + scaling (xd A^T) B^T, where xd is x after dropout (None: x itself)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        xd: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if xd is None else xd.reshape(-1, x.shape[-1])
        h = xd2 @ a.t()
        out = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        out.addmm_(h, b.t(), alpha=scaling)
        ctx.save_for_backward(xd2, h, weight, a, b)
        ctx.scaling, ctx.lead, ctx.separate = scaling, lead, xd is not None
        return out.view(*lead, out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xd2, h, weight, a, b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gh = (g @ b).mul_(ctx.scaling)
        grad_a = gh.t() @ xd2
        grad_b = (g.t() @ h).mul_(ctx.scaling)
        grad_x = grad_xd = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if not ctx.separate:
                grad_x.addmm_(gh, a)
            grad_x = grad_x.view(*ctx.lead, grad_x.shape[-1])
        if ctx.separate and ctx.needs_input_grad[1]:
            grad_xd = (gh @ a).view(*ctx.lead, a.shape[-1])
        if ctx.needs_input_grad[3]:
            grad_bias = g.sum(0)
        return grad_x, grad_xd, None, grad_bias, grad_a, grad_b, None


def _adapter(layer: Any, x: torch.Tensor) -> str | None:
    """The one adapter this call of `layer` (a peft LoRA Linear) on `x` can fuse, or None when
    peft's forward must run because the fused function would compute something else."""
    if layer.disable_adapters or layer.merged:
        return None
    names = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(names) != 1:
        return None
    name: str = names[0]
    base, a, b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    if (
        layer.use_dora.get(name, False)
        # peft 0.2x: DoRA, aLoRA, Arrow, BD-LoRA, ... each replace the adapter term
        or name in getattr(layer, "lora_variant", {})
        or type(base) is not nn.Linear  # quantized or Conv1D bases subclass or differ
        or base.weight.requires_grad
        # a hook or an instance forward (accelerate's offload) must see the base layer's call
        or base._forward_hooks
        or base._forward_pre_hooks
        or "forward" in vars(base)
        or type(a) is not nn.Linear
        or type(b) is not nn.Linear
        or a.bias is not None
        or b.bias is not None  # peft 0.2x's lora_bias: a term the fused matmuls lack
        or type(layer.lora_dropout[name]) not in (nn.Dropout, nn.Identity)
    ):
        return None
    if autocast_dtype(x.device.type) is None and any(
        t.dtype != x.dtype for t in (base.weight, a.weight, b.weight)
    ):
        # peft computes the adapter in its weights' dtype and adds it to the base output in the
        # wider of the two; the fused function has one dtype, which only autocast gives.
        return None
    return name


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if args or kwargs else _adapter(self, x)
    if name is None:
        out: torch.Tensor = type(self).forward(self, x, *args, **kwargs)  # peft's
        return out
    dtype = autocast_dtype(x.device.type) or x.dtype

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == dtype else t.to(dtype)

    base, dropout = self.base_layer, self.lora_dropout[name]
    x = cast(x)
    drops = isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0
    out = _LoraLinear.apply(
        x,
        dropout(x) if drops else None,
        cast(base.weight),
        None if base.bias is None else cast(base.bias),
        cast(self.lora_A[name].weight),
        cast(self.lora_B[name].weight),
        float(self.scaling[name]),
    )
    return out


def patch(model: nn.Module) -> int:
    """Route every peft LoRA Linear of the model through the fused function; returns how many."""
    from peft.tuners.lora import Linear as LoraLinear

    layers: list[Any] = [  # peft LoraLinear layers
        m
        for m in model.modules()
        if type(m) is LoraLinear and "forward" not in vars(m)  # not patched yet
    ]
    # DoRA rescales base plus adapter per output feature by a norm of the whole updated weight:
    # not a term the fused matmuls can add, so those layers keep peft's forward. rsLoRA changes
    # only `scaling`, which _forward reads from the layer, so it stays fused.
    dora = [m for m in layers if any(m.use_dora.values())]
    fused = [m for m in layers if m not in dora]
    for m in fused:
        m.forward = types.MethodType(_forward, m)
    log.info(
        "fused LoRA: %d adapted linear layers compute base and adapter in one function", len(fused)
    )
    if dora:
        log.info(
            "fused LoRA: %d DoRA layers keep peft's forward (the fused function has no "
            "magnitude term)",
            len(dora),
        )
    return len(fused)
