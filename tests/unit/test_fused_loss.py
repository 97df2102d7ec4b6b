"""Chunked loss against transformers' own: same loss, same gradients, logits never all alive."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedModel

from llmtrain import fused_loss
from llmtrain.config import resolve_path
from llmtrain.data import IGNORE_INDEX


def tiny() -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        resolve_path("embedded:tiny-llama"), torch_dtype=torch.float32
    )
    return model.train()


def batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 40), generator=g)
    labels = ids.clone()
    labels[:, :15] = IGNORE_INDEX  # prompts
    labels[2, 30:] = IGNORE_INDEX  # padding
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("freeze_head", [False, True], ids=["full", "frozen-lm-head"])
def test_loss_and_gradients_equal_transformers(
    monkeypatch: pytest.MonkeyPatch, freeze_head: bool
) -> None:
    reference = tiny()
    ours = copy.deepcopy(reference)
    for m in (reference, ours):
        m.lm_head.requires_grad_(not freeze_head)
    # 4 chunks of 32 tokens over 3 x 40: chunks cross row boundaries.
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 32 * reference.config.vocab_size)
    assert fused_loss.patch_causal_lm_loss(ours)
    inputs = batch(reference.config.vocab_size)
    ref_out = reference(**inputs)
    out = ours(**inputs)
    assert out.logits is None  # never built
    torch.testing.assert_close(out.loss, ref_out.loss)
    ref_out.loss.backward()
    out.loss.backward()
    for (name, p), q in zip(reference.named_parameters(), ours.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None and freeze_head and name == "lm_head.weight"
            continue
        assert q.grad is not None
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)


def test_evaluation_keeps_logits_and_unsupported_models_are_left_alone() -> None:
    model = tiny()
    fused_loss.patch_causal_lm_loss(model)
    model.eval()
    inputs = batch(model.config.vocab_size)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits is not None and out.logits.shape == (3, 40, model.config.vocab_size)
    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)
    )
    forward = gpt2.forward
    assert not fused_loss.patch_causal_lm_loss(gpt2)
    assert gpt2.forward == forward
