"""Causal-LM loss over the vocabulary in chunks of tokens, never holding the full logits.

transformers 4.37.2's LlamaForCausalLM computes logits for every token, upcasts all of them to
fp32 and shifts a copy: for 8 x 2048 tokens and a 32k vocabulary that is several GiB of
activations alive at once. Here the loss is summed chunk by chunk, each chunk under activation
checkpointing (its logits are recomputed in the backward pass, one extra lm_head matmul per
chunk), and divided by the number of label tokens: the same mean as transformers'. Training
can ask for the sum instead (`loss_reduction="sum"`), which loss_weighting divides by the loss
tokens of the whole optimizer step.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from llmtrain.kernels import ops as fused_ops
from llmtrain.labels import IGNORE_INDEX

CrossEntropySum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

log = logging.getLogger(__name__)

# Causal-LM classes whose forward (transformers 4.37.2) is exactly: decoder -> lm_head -> fp32
# logits -> shifted mean cross-entropy, with no extra loss terms.
SUPPORTED = ("llama", "mistral", "qwen2", "gemma")
CHUNK_ELEMENTS = 1 << 27  # logits per chunk: 0.5 GiB in fp32


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
    """While training with labels, compute the loss in chunks (logits are then not returned);
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
        loss = chunked_lm_loss(
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
    return True
