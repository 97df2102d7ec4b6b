"""Causal-LM loss without the full logits: Liger's fused linear cross-entropy on CUDA, else
llmtrain's chunks.

transformers 4.37.2's LlamaForCausalLM computes logits for every token, upcasts all of them to
fp32 and shifts a copy: for 8 x 2048 tokens and a 32k vocabulary that is several GiB of
activations alive at once. Both paths below return the same fp32 scalar, the next-token
cross-entropy (token t's hidden state predicts labels[t + 1], -100 takes no loss) summed over the
label tokens and divided by their number: the same mean as transformers'. Training can ask for
the sum instead (`loss_reduction="sum"`), which loss_weighting divides by the loss tokens of the
whole optimizer step.

- Liger (`liger_kernel.functional.fused_linear_cross_entropy`, liger-kernel 0.8.5; Hsu et al.
  2024, "Liger Kernel: Efficient Triton Kernels for LLM Training", arXiv:2410.10989): chunks of
  tokens through lm_head and a Triton cross-entropy that writes the logits' gradient in place;
  the gradients of the hidden states and of lm_head's weight are computed in the forward pass
  and only scaled by the incoming gradient in backward (1.6-1.8% faster than the chunks below on
  an H200, bench/RESULTS.md 2026-12-01, second session). It keeps [tokens, hidden] (the hidden
  states' gradient, in the matmul dtype) and, when lm_head trains, [vocab, hidden] (its weight's
  gradient, in the weight's dtype) from the forward to the backward, plus one chunk of
  [tokens / ceil(vocab / hidden), vocab] logits during the forward. Taken on CUDA with torch
  >= LIGER_MIN_TORCH when liger_kernel and triton import and lm_head is a plain nn.Linear with
  its whole weight at the call (see `liger_unusable`); otherwise, and for the reason logged
  once, the chunks below.
- llmtrain's chunks (`chunked_lm_loss`): the loss summed chunk by chunk, each chunk under
  activation checkpointing (its logits are recomputed in the backward pass, one extra lm_head
  matmul per chunk).

Dtypes. The hidden states go into Liger in the dtype the lm_head matmul runs in: autocast's
(bf16/fp16; the cast autocast's linear would make) under autocast, else the weight's. The weight
is passed as it is: fp32 weights under autocast are cast per matmul by autocast inside Liger, as
the chunked path's lm_head casts them per chunk, and their gradient accumulates in fp32
(torch.addmm with out_dtype); bf16 weights (training.param_dtype=bfloat16) accumulate their
gradient in bf16, as autograd sums the chunked path's per-chunk gradients in the .grad's dtype.
A bias is cast with the hidden states (autocast casts it for the linear too). The loss is fp32.

Liger 0.8.5, read for this (liger_kernel/ops/fused_linear_cross_entropy.py): a frozen lm_head
weight (LoRA) gets no gradient buffer (`weight.requires_grad` False); a bias gets one even when
frozen ([vocab], dropped by autograd). The backward multiplies the stored gradients by the
incoming gradient unless it is exactly 1, so loss_weighting's scale of the summed loss (and
accelerate's division by the accumulation steps) reaches them; each micro-batch's call keeps
its own gradients, so gradient accumulation sums them as for any other op. Its backward may run
only once per forward (it scales the stored gradients in place): no retain_graph double
backward. It computes no gradient at all when the hidden states need none, so a trained lm_head
over a frozen decoder takes the chunks. Its public function syncs the host three times per call
(the count of label tokens in the forward, the check of the incoming gradient against 1 in the
backward); with the kernel version kernels/fused_linear_ce.py was read against, llmtrain drives
the same kernel through that module instead, without a sync.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from llmtrain import compat
from llmtrain.kernels import fused_linear_ce
from llmtrain.kernels import ops as fused_ops
from llmtrain.labels import IGNORE_INDEX

CrossEntropySum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

log = logging.getLogger(__name__)

# Causal-LM classes whose forward (transformers 4.37.2) is exactly: decoder -> lm_head -> fp32
# logits -> shifted mean cross-entropy, with no extra loss terms.
SUPPORTED = ("llama", "mistral", "qwen2", "gemma")
CHUNK_ELEMENTS = 1 << 27  # logits per chunk: 0.5 GiB in fp32
# Liger's loss only from this torch on: older torch (NGC 24.04's 2.3) lacks torch.addmm's
# out_dtype, so Liger 0.8.5 accumulates an fp32 lm_head weight's gradient through a bf16 and an
# fp32 temporary of the weight's size per chunk, and its kernels were measured on torch 2.11.
LIGER_MIN_TORCH = (2, 8)
# Reasons already logged, so that each choice of loss path is logged once per process.
_ANNOUNCED: set[str] = set()


def _announce(message: str) -> None:
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        log.info("%s", message)


@functools.cache
def liger_loss_function() -> tuple[Callable[..., Any] | None, str]:
    """Liger's fused linear cross-entropy and its version, or None and why not; decided once per
    process. liger_kernel is imported only here and only with CUDA: it needs triton, which the
    CPU wheel of torch does not bring."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    if not compat.at_least("torch", *LIGER_MIN_TORCH):
        return None, f"torch {torch.__version__} is older than %d.%d" % LIGER_MIN_TORCH
    try:
        import triton  # noqa: F401
        from liger_kernel.functional import fused_linear_cross_entropy
    except Exception as exc:  # ImportError, or a triton that cannot load its CUDA driver
        return None, f"liger-kernel not usable ({type(exc).__name__}: {exc})"
    version = metadata.version("liger-kernel")
    if version == fused_linear_ce.KERNEL_VERSION:
        return fused_linear_ce.fused_linear_cross_entropy, f"liger-kernel {version}'s kernel, " \
            "without host syncs"
    return fused_linear_cross_entropy, f"liger-kernel {version}"


def liger_unusable(hidden: torch.Tensor, lm_head: nn.Module) -> str | None:
    """Why this call cannot take Liger's fused linear cross-entropy, or None if it can. Cheap
    (attribute and shape checks), so checked at each call: a weight can be whole at one call and
    a shard at another (DeepSpeed ZeRO-3 leaves an empty tensor outside the module's own call,
    FSDP a flat shard), and the fused loss computes lm_head without calling the module."""
    function, why = liger_loss_function()
    if function is None:
        return why
    if type(lm_head) is not nn.Linear:  # peft's LoRA layer, a bitsandbytes Linear4bit, ...
        return f"lm_head is a {type(lm_head).__module__}.{type(lm_head).__qualname__}"
    if lm_head._forward_hooks or lm_head._forward_pre_hooks or hasattr(lm_head, "_hf_hook"):
        return "lm_head has forward hooks (a sharding or offloading wrapper), which it would skip"
    weight, bias = lm_head.weight, lm_head.bias
    if type(weight) not in (nn.Parameter, torch.Tensor):  # DTensor, Params4bit, ...
        return f"lm_head.weight is a {type(weight).__name__}, not a plain tensor"
    if tuple(weight.shape) != (lm_head.out_features, hidden.shape[-1]):
        return (
            f"lm_head.weight has shape {tuple(weight.shape)}, not [vocab, hidden] = "
            f"[{lm_head.out_features}, {hidden.shape[-1]}] (sharded?)"
        )
    if bias is not None and tuple(bias.shape) != (lm_head.out_features,):
        return f"lm_head.bias has shape {tuple(bias.shape)}, not [{lm_head.out_features}]"
    if not (hidden.is_cuda and weight.is_cuda):
        return f"hidden states on {hidden.device}, lm_head.weight on {weight.device}"
    if not torch.is_grad_enabled():
        return "gradients are off (it computes them in the forward pass)"
    if weight.requires_grad and not hidden.requires_grad:
        return "lm_head trains but the hidden states need no gradient (Liger would give none)"
    return None


def liger_lm_loss(
    hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy through Liger's fused linear cross-entropy, fp32 scalar; the
    arguments and `reduction` as chunked_lm_loss's. The caller checks liger_unusable first."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss reduction {reduction!r}: use 'mean' or 'sum'")
    function, _ = liger_loss_function()
    assert function is not None
    weight, bias = lm_head.weight, lm_head.bias
    # The dtype lm_head's matmul runs in: autocast's, else the weight's (as nn.Linear).
    dtype = fused_ops.autocast_dtype("cuda") or weight.dtype
    flat = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()
    targets = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    loss: torch.Tensor = function(
        flat,
        weight,
        targets.to(flat.device).contiguous(),
        bias.to(dtype) if bias is not None else None,
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )[0]
    return loss.float()


def lm_loss(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int,
    ce_sum: CrossEntropySum = fused_ops.cross_entropy_sum,
    reduction: str = "mean",
) -> torch.Tensor:
    """The training loss: Liger's fused linear cross-entropy where liger_unusable says it can
    run, else chunked_lm_loss; each choice (and why) logged once at info level."""
    why_not = liger_unusable(hidden, lm_head)
    if why_not is None:
        _announce(f"chunked loss: Liger's fused linear cross-entropy ({liger_loss_function()[1]})")
        assert isinstance(lm_head, nn.Linear)
        return liger_lm_loss(hidden, lm_head, labels, reduction)
    _announce(f"chunked loss: llmtrain's chunks, not Liger's fused loss: {why_not}")
    return chunked_lm_loss(hidden, lm_head, labels, chunk_tokens, ce_sum, reduction)


def _chunk_loss_sum(
    lm_head: nn.Module, ce_sum: CrossEntropySum, hidden: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    return ce_sum(lm_head(hidden), labels)


def chunked_lm_loss(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    chunk_tokens: int,
    ce_sum: CrossEntropySum = fused_ops.cross_entropy_sum,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy, fp32 scalar: token t's hidden state predicts labels[t + 1].

    hidden: [batch, length, hidden], the decoder's last hidden state in the model's dtype;
    labels: int64 [batch, length], -100 where no loss is taken; chunk_tokens: tokens per chunk
    (chunk_tokens x vocab logits exist at once, in the lm_head's dtype, fp32 inside ce_sum).
    `reduction`: "mean" over the label tokens (transformers'), or "sum" over them; any other
    value is a ValueError (a caller's bug, not a user error)."""
    targets = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        total = total + checkpoint(
            functools.partial(_chunk_loss_sum, lm_head, ce_sum),
            flat[piece],
            targets[piece],
            use_reentrant=False,
        )
    if reduction == "sum":
        return total
    if reduction != "mean":
        raise ValueError(f"loss reduction {reduction!r}: use 'mean' or 'sum'")
    return total / (targets != IGNORE_INDEX).sum()


def patch_causal_lm_loss(model: Any, *, compiled: bool = False) -> bool:
    """While training with labels, compute the loss without the full logits (they are then not
    returned): Liger's fused linear cross-entropy where it can run (lm_loss), else in chunks;
    `compiled`: each chunk's cross-entropy through torch.compile, which reads the 16-bit logits
    once instead of storing an fp32 copy. The patched forward takes `loss_reduction` ("mean"
    or "sum") while training. Evaluation and generation keep the original forward.
    False if the model is not supported."""
    config = model.config
    if config.model_type not in SUPPORTED or getattr(config, "pretraining_tp", 1) != 1:
        log.info("chunked loss: not for %s models; using transformers' loss", config.model_type)
        return False
    original = model.forward
    chunk_tokens = max(256, CHUNK_ELEMENTS // config.vocab_size)
    ce_sum = fused_ops.compiled("cross_entropy_sum") if compiled else fused_ops.cross_entropy_sum

    def forward(
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        loss_reduction: str = "mean",
        **kwargs: Any,
    ) -> Any:
        if labels is None or not model.training:
            return original(input_ids=input_ids, labels=labels, return_dict=return_dict, **kwargs)
        # Training never reads a KV cache: keep transformers from building one.
        out = model.model(input_ids=input_ids, return_dict=True, **{**kwargs, "use_cache": False})
        loss = lm_loss(
            out.last_hidden_state, model.lm_head, labels, chunk_tokens, ce_sum, loss_reduction
        )
        if return_dict is False:
            return (loss, *out.to_tuple()[1:])  # as transformers' tuple, without logits
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    model.forward = forward
    log.info(
        "chunked loss: %d tokens per chunk, full logits never materialised%s",
        chunk_tokens,
        " (compiled cross-entropy)" if compiled else "",
    )
    function, why = liger_loss_function()
    if function is None:  # the same for every call of this process: say it now
        _announce(f"chunked loss: llmtrain's chunks, not Liger's fused loss: {why}")
    return True
