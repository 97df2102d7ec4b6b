"""Chunked loss against transformers' own: same loss, same gradients, logits never all alive."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, PreTrainedModel

from llmtrain.config import resolve_path
from llmtrain.kernels import loss as fused_loss
from llmtrain.kernels import ops as fused_ops
from llmtrain.labels import IGNORE_INDEX


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


def test_compiled_option_routes_each_chunk_through_the_compiled_cross_entropy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The eager function stands in for its torch.compile version (the GPU test runs that)."""
    asked: list[str] = []
    monkeypatch.setattr(
        fused_ops, "compiled", lambda name: asked.append(name) or fused_ops._EAGER[name]
    )
    reference, ours = tiny(), tiny()
    assert fused_loss.patch_causal_lm_loss(ours, compiled=True)
    assert asked == ["cross_entropy_sum"]
    inputs = batch(reference.config.vocab_size)
    torch.testing.assert_close(ours(**inputs).loss, reference(**inputs).loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.compile)")
def test_compiled_cross_entropy_matches_eager_on_gpu() -> None:
    logits = torch.randn(300, 1000, device="cuda", dtype=torch.bfloat16) * 4
    labels = torch.randint(0, 1000, (300,), device="cuda")
    labels[::7] = IGNORE_INDEX
    results = []
    for fn in (fused_ops.cross_entropy_sum, fused_ops.compiled("cross_entropy_sum")):
        x = logits.clone().requires_grad_()
        loss = fn(x, labels)
        loss.backward()
        results.append((loss, x.grad))
    (want, want_grad), (got, got_grad) = results
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-2, atol=1e-3)
