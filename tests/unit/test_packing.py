"""Padding-free packing on the embedded tiny Llama (CPU): per-sample losses equal packed and
unpacked, positions restart, and no sample attends to another."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedModel

from llmtrain import stack
from llmtrain.config import resolve_path
from llmtrain.data.collate import PadCollator
from llmtrain.errors import ConfigError
from llmtrain.kernels import ops as fused_ops
from llmtrain.kernels import varlen_attention as packing
from llmtrain.labels import IGNORE_INDEX
from tests.tiny_models import tiny_config

LENGTHS = [(5, 7), (11, 2), (3, 14), (9, 9)]  # (prompt, response) tokens per sample


def samples(vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, r in LENGTHS:
        ids = torch.randint(3, vocab, (p + r,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def tiny_llama(attn: str = "sdpa") -> PreTrainedModel:
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        resolve_path("embedded:tiny-llama"), attn_implementation=attn, torch_dtype=torch.float32
    )
    return model.eval()


def tiny_mistral() -> PreTrainedModel:
    torch.manual_seed(0)
    config = tiny_config("mistral")
    config._attn_implementation = "sdpa"
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
    return model.eval()


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean next-token loss of one sample: logits [n, V], labels [n]."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX).item()


def unpacked_losses(model: PreTrainedModel, batch: list[dict[str, list[int]]]) -> list[float]:
    out = []
    with torch.no_grad():
        for s in batch:
            logits = model(input_ids=torch.tensor([s["input_ids"]], device=model.device)).logits[0]
            out.append(
                per_sample_loss(logits.float(), torch.tensor(s["labels"], device=model.device))
            )
    return out


def packed_logits(model: PreTrainedModel, batch: list[dict[str, list[int]]]) -> torch.Tensor:
    row = packing.PackingCollator()(batch)
    with torch.no_grad():
        logits: torch.Tensor = model(
            input_ids=row["input_ids"], position_ids=row["position_ids"]
        ).logits[0]
    return logits


def split(t: torch.Tensor, batch: list[dict[str, list[int]]]) -> tuple[torch.Tensor, ...]:
    return t.split([len(s["input_ids"]) for s in batch])


def test_collator_restarts_positions_without_padding() -> None:
    batch = samples(512)
    row = packing.PackingCollator()(batch)
    total = sum(p + r for p, r in LENGTHS)
    assert row["input_ids"].shape == row["labels"].shape == row["position_ids"].shape == (1, total)
    assert "attention_mask" not in row
    for s, ids, pos, lab in zip(
        batch,
        *(split(row[k][0], batch) for k in ("input_ids", "position_ids", "labels")),
        strict=True,
    ):
        assert ids.tolist() == s["input_ids"]
        assert pos.tolist() == list(range(len(s["input_ids"])))
        # The first token's label would be predicted from the previous sample: dropped.
        assert lab[0].item() == IGNORE_INDEX
        assert lab[1:].tolist() == s["labels"][1:]
    segs = packing.find_segments(row["position_ids"], 1, total)
    assert segs.lengths == [p + r for p, r in LENGTHS]
    assert segs.cu_seqlens.tolist() == [0, 12, 25, 42, 60]


@pytest.mark.parametrize("make", [tiny_llama, tiny_mistral], ids=["llama", "mistral"])
def test_per_sample_losses_equal_packed_and_unpacked(make) -> None:  # type: ignore[no-untyped-def]
    model = make()
    batch = samples(model.config.vocab_size)
    reference = unpacked_losses(model, batch)
    packing.patch_attention(model)
    logits = packed_logits(model, batch)
    assert model.model.layers[0].self_attn._llmtrain_kernel == "sdpa_per_sample"
    packed = [
        per_sample_loss(lg, torch.tensor(s["labels"]))
        for lg, s in zip(split(logits, batch), batch, strict=True)
    ]
    assert packed == pytest.approx(reference, abs=1e-5)
    assert len(set(round(x, 3) for x in reference)) == len(reference)  # the samples differ


def test_batch_loss_equals_padded_batch_loss() -> None:
    """What the Trainer optimises: HF's loss of the packed row = its loss of the padded batch."""
    model = tiny_llama()
    batch = samples(model.config.vocab_size)
    with torch.no_grad():
        padded = model(**PadCollator(pad_token_id=0)(batch)).loss.item()
        packing.patch_attention(model)
        packed = model(**packing.PackingCollator()(batch)).loss.item()
    assert packed == pytest.approx(padded, abs=1e-5)


def test_a_full_batch_goes_without_its_all_ones_mask() -> None:
    """PadCollator(omit_full_mask=True), finetune's collator for data.packing=none: a batch in
    which no row is padded has no attention_mask (transformers 4.37.2 would read an all-ones
    one on the host, a GPU sync, only to drop it); a padded batch keeps its mask, and so does
    the default collator."""
    full = [{"input_ids": list(range(3, 11)), "labels": list(range(3, 11))}] * 2
    ragged = [full[0], {"input_ids": [3, 4, 5], "labels": [3, 4, 5]}]
    assert set(PadCollator(0, omit_full_mask=True)(full)) == {"input_ids", "labels"}
    kept = PadCollator(0, omit_full_mask=True)(ragged)
    assert kept["attention_mask"].tolist() == [[1] * 8, [1, 1, 1] + [0] * 5]
    assert PadCollator(0)(full)["attention_mask"].tolist() == [[1] * 8] * 2
    odd = [{"input_ids": list(range(3, 10)), "labels": list(range(3, 10))}] * 2  # padded to 8
    assert "attention_mask" in PadCollator(0, omit_full_mask=True)(odd)


def test_unpacked_rows_are_whole_samples_without_reading_their_positions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """patch_attention(packed=False) (data.packing none with training.compile): an unmasked row
    is one sample, taken as such without find_segments (its host syncs), with the logits of the
    model's own attention; a padded batch (a mask) still takes the model's own forward."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 16), generator=g)
    rows = [{"input_ids": r, "labels": r} for r in ids.tolist()]
    ragged = [*rows[:2], {"input_ids": rows[2]["input_ids"][:9], "labels": rows[2]["labels"][:9]}]
    padded = PadCollator(0, omit_full_mask=True)(ragged)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        want_padded = model(**padded).logits
        packing.patch_attention(model, packed=False)

        def no_positions(*args: Any) -> None:
            raise AssertionError("find_segments read the positions")

        monkeypatch.setattr(packing, "find_segments", no_positions)
        got = model(**PadCollator(0, omit_full_mask=True)(rows)).logits
        # llmtrain's attention ran (it records its kernel), not the model's own
        assert model.model.layers[0].self_attn._llmtrain_kernel
        got_padded = model(**padded).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mask = padded["attention_mask"].bool()
    torch.testing.assert_close(got_padded[mask], want_padded[mask], rtol=1e-5, atol=1e-5)


def test_no_attention_across_samples() -> None:
    model = tiny_llama()
    batch = samples(model.config.vocab_size)
    changed = [dict(s) for s in batch]
    changed[1] = {**batch[1], "input_ids": [(t + 1) % 512 for t in batch[1]["input_ids"]]}

    def effect(m: PreTrainedModel) -> list[float]:
        a, b = split(packed_logits(m, batch), batch), split(packed_logits(m, changed), batch)
        return [(x - y).abs().max().item() for x, y in zip(a, b, strict=True)]

    # Unpatched, the row is one causal sequence: sample 1 leaks into samples 2 and 3.
    leaky = effect(model)
    assert leaky[0] == 0 and leaky[2] > 1e-3 and leaky[3] > 1e-3
    packing.patch_attention(model)
    isolated = effect(model)
    assert isolated[1] > 1e-3
    assert isolated[0] == isolated[2] == isolated[3] == 0.0


def test_padded_batches_keep_the_original_attention() -> None:
    """Evaluation with PadCollator batches after patching: unchanged outputs."""
    model = tiny_llama()
    batch = PadCollator(pad_token_id=0)(samples(model.config.vocab_size))
    with torch.no_grad():
        before = model(**batch).logits
        packing.patch_attention(model)
        after = model(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_kernel_choice_is_logged_at_first_use(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_llama()
    packing.choose_kernel.cache_clear()
    with caplog.at_level(logging.INFO, logger="llmtrain.kernels.varlen_attention"):
        packing.patch_attention(model)
        packed_logits(model, samples(model.config.vocab_size))
    assert "padding-free attention on 4 attention modules" in caplog.text
    assert "padding-free attention: kernel sdpa_per_sample (cpu, torch.float32)" in caplog.text
    if stack.is_current():  # the registry's function, after transformers' own RoPE
        assert model.config._attn_implementation == packing.ATTENTION_NAME
    else:
        assert model.model.layers[0].self_attn._llmtrain_rope is fused_ops.rope


def test_refuses_eager_attention_and_unknown_architectures() -> None:
    with pytest.raises(ConfigError, match="attn_implementation"):
        packing.patch_attention(tiny_llama(attn="eager"))
    model = AutoModelForCausalLM.from_config(tiny_config("gpt2"))
    with pytest.raises(ConfigError, match="supports llama, mistral"):
        packing.patch_attention(model)


def test_sdpa_per_sample_kernel_matches_dense_block_mask() -> None:
    """The CPU kernel against an explicit block-diagonal causal mask, with grouped KV heads."""
    torch.manual_seed(0)
    lengths = [4, 9, 3]
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, 8) for h in (4, 2, 2))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    out = packing._sdpa_per_sample(q, k, v, packing.find_segments(pos, 1, total), 0.0)
    sample = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    idx = torch.arange(total)
    allowed = (sample[:, None] == sample[None, :]) & (idx[:, None] >= idx[None, :])
    dense = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=allowed,
    ).transpose(0, 1)
    torch.testing.assert_close(out, dense)


def test_fused_ops_match_transformers() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    torch.manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-6)
    norm.weight.data.normal_()
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(fused_ops.rms_norm(x, norm.weight, 1e-6), norm(x), rtol=0, atol=0)
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)  # [batch, heads, seq, dim]
    cos, sin = torch.randn(6, 8), torch.randn(6, 8)
    pos = torch.arange(6)[None].expand(2, 6)
    if stack.is_current():  # 5.x takes cos and sin already gathered at the positions
        ref_q, ref_k = apply_rotary_pos_emb(q, k, cos[pos], sin[pos])
    else:
        ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin, pos)
    flat = pos.reshape(-1)
    got_q, got_k = fused_ops.rope(
        q.transpose(1, 2).reshape(12, 4, 8),
        k.transpose(1, 2).reshape(12, 2, 8),
        cos[flat][:, None],
        sin[flat][:, None],
    )
    torch.testing.assert_close(got_q, ref_q.transpose(1, 2).reshape(12, 4, 8), rtol=0, atol=0)
    torch.testing.assert_close(got_k, ref_k.transpose(1, 2).reshape(12, 2, 8), rtol=0, atol=0)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            ],
        ),
    ],
)
def test_whole_rows_attention_matches_the_per_sample_kernel(device: str) -> None:
    """Rows of one sample each take scaled_dot_product_attention on [batch, heads, len, dim]
    views (cuDNN first on GPUs): the same result as one causal attention per sample, with
    grouped KV heads, forward and input gradients. In fp32 on a GPU no fused kernel takes
    grouped heads: the math kernel must (it raised "No available kernel" before)."""
    torch.manual_seed(0)
    batch, length = 3, 16
    inputs = [
        torch.randn(batch * length, h, 8, device=device, requires_grad=True) for h in (4, 2, 2)
    ]
    seg = packing.find_segments(
        torch.arange(length, device=device).repeat(batch, 1), batch, length
    )
    rows = packing._sdpa_rows(*inputs, batch, 0.0)
    rows_grads = torch.autograd.grad(rows.square().sum(), inputs)
    per_sample = packing._sdpa_per_sample(*inputs, seg, 0.0)
    per_sample_grads = torch.autograd.grad(per_sample.square().sum(), inputs)
    torch.testing.assert_close(rows, per_sample)
    for got, want in zip(rows_grads, per_sample_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_whole_rows_in_fp32_with_grouped_heads_keep_no_score_matrix() -> None:
    """fp32 with grouped-query heads: k and v are repeated for the memory-efficient kernel. The
    math kernel, which alone takes them unrepeated, keeps the fp32 scores and their softmax,
    [1, 8, 4096, 4096] here, 512 MiB each: the step may hold a small part of one."""
    torch.manual_seed(0)
    length, dim = 4096, 64
    inputs = [
        torch.randn(length, h, dim, device="cuda", requires_grad=True) for h in (8, 2, 2)
    ]
    scores = 8 * length * length * 4
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = packing._sdpa_rows(*inputs, 1, 0.0)
    out.sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < scores / 4
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in inputs)


def test_whole_rows_path_is_for_cuda_only() -> None:
    assert packing.ranked_sdpa(torch.device("cpu")) is False
    # What CUDA devices ask: answered on any torch, without inspecting builtins.
    assert isinstance(packing.ranks_backends(), bool)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_kernel_and_compiled_ops_keep_per_sample_losses() -> None:
    """On a GPU: the varlen kernel chosen there and the compiled norms/MLP/RoPE, bf16."""
    reference_model = tiny_llama().cuda().to(torch.bfloat16)
    batch = samples(reference_model.config.vocab_size)
    reference = unpacked_losses(reference_model, batch)
    model = tiny_llama().cuda().to(torch.bfloat16)
    packing.patch_attention(model, compiled_rope=True)
    fused_ops.compile_blocks(model)
    row = {k: v.cuda() for k, v in packing.PackingCollator()(batch).items()}
    with torch.no_grad():
        logits = model(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits[0]
    packed = [
        per_sample_loss(lg.float(), torch.tensor(s["labels"], device="cuda"))
        for lg, s in zip(split(logits, batch), batch, strict=True)
    ]
    assert model.model.layers[0].self_attn._llmtrain_kernel in ("flash_attn", "torch_varlen")
    assert packed == pytest.approx(reference, rel=2e-2)
    # One sample per row: the whole-row (cuDNN-first) path, same losses as unpacked.
    whole = samples(reference_model.config.vocab_size)[:1]
    ids = torch.tensor([whole[0]["input_ids"]], device="cuda")
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1], device="cuda")[None])
    got = per_sample_loss(logits.logits[0].float(), torch.tensor(whole[0]["labels"], device="cuda"))
    assert got == pytest.approx(unpacked_losses(reference_model, whole)[0], rel=2e-2)


def test_compiled_block_structure_matches_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The patched layers, MLPs and norms compute what transformers does, loss and gradients
    (the eager functions stand in for their torch.compile versions, which the GPU test runs)."""
    monkeypatch.setattr(fused_ops, "compiled", lambda name: fused_ops._EAGER[name])
    reference, model = tiny_llama().train(), tiny_llama().train()
    packing.patch_attention(model, compiled_rope=True)
    assert fused_ops.compile_blocks(model) == 4 + 4 + 2 * 4 + 1  # layers, MLPs, norms
    batch = PadCollator(pad_token_id=0)(samples(model.config.vocab_size))
    batch.pop("attention_mask")  # unpadded rows take the patched attention
    ref_loss, loss = reference(**batch).loss, model(**batch).loss
    torch.testing.assert_close(loss, ref_loss)
    ref_loss.backward()
    loss.backward()
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        # Per-sample attention sums in another order than one batched SDPA call.
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=5e-5)


@pytest.mark.skipif(
    not stack.is_current(), reason="pinned stack: llmtrain's attention forward applies RoPE"
)
def test_current_stack_routes_transformers_rope_through_torch_compile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """transformers 5.x applies RoPE inside its attention forward: compile_blocks swaps the
    modeling module's apply_rotary_pos_emb for compiled(...) of it (here a counting eager
    stand-in), and the loss stays transformers'."""
    import sys

    model = tiny_llama().train()
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    library_rope = module.apply_rotary_pos_emb
    monkeypatch.setattr(module, "apply_rotary_pos_emb", library_rope)  # restored after the test
    batch = PadCollator(pad_token_id=0)(samples(model.config.vocab_size))
    batch.pop("attention_mask")
    reference = model(**batch).loss
    calls: list[str] = []

    def counting(name: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fused_ops._EAGER[name](*args, **kwargs)

        return run

    monkeypatch.setattr(fused_ops, "compiled", counting)
    fused_ops.compile_blocks(model)
    torch.testing.assert_close(model(**batch).loss, reference)
    rope = f"{module.__name__}.apply_rotary_pos_emb"
    assert fused_ops._EAGER[rope] is library_rope
    assert calls.count(rope) == model.config.num_hidden_layers


def test_autocast_input_casts_once_under_autocast_only() -> None:
    x = torch.randn(4, 8)
    assert fused_ops.autocast_input(x) is x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_ops.autocast_input(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, x.to(torch.bfloat16), rtol=0, atol=0)


def test_generation_keeps_the_librarys_path() -> None:
    """Generating after patching: a left-padded batch (attention mask) takes transformers'
    attention throughout, the same greedy tokens and scores. Current stack, without padding:
    the prompt is one sample (llmtrain's kernel), every later token has cached keys
    (transformers'); the same tokens, scores within fp32 rounding. (On the pinned stack the
    patched forward keeps no keys for the cache, so it generates with padding only.)"""
    model = tiny_llama()
    padded = torch.tensor([[0, 0, 5, 9, 17, 4], [7, 3, 8, 11, 2, 6]])
    cases = [padded, padded[1:]] if stack.is_current() else [padded]
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def greedy(prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model.generate(
            input_ids=prompts,
            attention_mask=(prompts != 0).long(),
            return_dict_in_generate=True,
            output_scores=True,
            **kwargs,
        )
        return out.sequences, torch.stack(out.scores)

    with torch.no_grad():
        before = [greedy(prompts) for prompts in cases]
        packing.patch_attention(model)
        after = [greedy(prompts) for prompts in cases]
    assert torch.equal(after[0][0], before[0][0])
    torch.testing.assert_close(after[0][1], before[0][1], rtol=0, atol=0)
    for (tokens, scores), (want_tokens, want_scores) in zip(after[1:], before[1:], strict=True):
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(scores, want_scores)


def test_sample_longer_than_the_sliding_window_is_refused() -> None:
    model = tiny_mistral()
    model.config.sliding_window = 12
    packing.patch_attention(model)
    batch = samples(model.config.vocab_size)  # samples of 12, 13, 17 and 18 tokens
    with pytest.raises(ConfigError, match="longer than the model's sliding window"):
        packed_logits(model, batch)
    model.config.sliding_window = 18  # every sample fits: the same losses as unpacked
    reference = unpacked_losses(model, batch)
    packed = [
        per_sample_loss(lg, torch.tensor(s["labels"]))
        for lg, s in zip(split(packed_logits(model, batch), batch), batch, strict=True)
    ]
    assert packed == pytest.approx(reference, abs=1e-5)


@pytest.mark.skipif(not stack.is_current(), reason="transformers 5.x's attention registries")
def test_registered_function_matches_sdpa_with_a_block_mask() -> None:
    """varlen_attention_forward against transformers' sdpa_attention_forward given the
    block-diagonal causal mask: two packed rows, grouped KV heads, a non-default softmax
    scale; forward and input gradients, in transformers' [batch, len, heads, dim] layout."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True  # type: ignore[assignment]
    lengths = [[5, 9, 2], [16]]
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    inputs = [torch.randn(2, h, 16, 8, requires_grad=True) for h in (4, 2, 2)]
    out, weights = packing.varlen_attention_forward(
        module, *inputs, None, scaling=0.3, position_ids=position_ids
    )
    assert weights is None and out.shape == (2, 16, 4, 8)
    sample = torch.stack(
        [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths]
    )
    idx = torch.arange(16)
    allowed = (sample[:, :, None] == sample[:, None, :]) & (idx[:, None] >= idx[None, :])
    dense, _ = sdpa_attention_forward(module, *inputs, allowed[:, None], scaling=0.3)
    torch.testing.assert_close(out, dense)
    for got, want in zip(
        torch.autograd.grad(out.square().sum(), inputs),
        torch.autograd.grad(dense.square().sum(), inputs),
        strict=True,
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(not stack.is_current(), reason="transformers 5.x's mask registry")
def test_packed_row_gets_no_dense_mask_and_padding_keeps_sdpas() -> None:
    """transformers' create_causal_mask for the switched model: nothing over a packed row
    (sdpa's would be a [1, 1, len, len] block mask); sdpa's own mask for a padded batch."""
    from transformers.masking_utils import create_causal_mask

    model = tiny_llama()
    row = packing.PackingCollator()(samples(model.config.vocab_size))
    embeds = model.get_input_embeddings()(row["input_ids"])
    # The cache arguments changed within 5.x (past_key_values, cache_position, cache; the
    # H200's 5.17 takes no cache_position, 5.24 only cache): no cache, whichever it takes.
    params = inspect.signature(create_causal_mask).parameters

    def no_cache(length: int) -> dict[str, Any]:
        given = {"cache": None, "past_key_values": None, "cache_position": torch.arange(length)}
        return {k: v for k, v in given.items() if k in params}

    packed = {"attention_mask": None, "position_ids": row["position_ids"], **no_cache(60)}
    sdpa_packed = create_causal_mask(model.config, embeds, **packed)
    assert sdpa_packed is not None and sdpa_packed.shape == (1, 1, 60, 60)
    padded = torch.ones(2, 30, dtype=torch.long)
    padded[0, :4] = 0
    pad = {"attention_mask": padded, "position_ids": None, **no_cache(30)}
    sdpa_padded = create_causal_mask(model.config, embeds.view(2, 30, -1), **pad)
    packing.patch_attention(model)
    assert create_causal_mask(model.config, embeds, **packed) is None
    mask = create_causal_mask(model.config, embeds.view(2, 30, -1), **pad)
    assert mask is not None and torch.equal(mask, sdpa_padded)


@pytest.mark.parametrize(("data_packing", "packed"), [("padding_free", True), ("none", False)])
def test_finetune_tells_the_attention_whether_rows_are_packed(
    data_packing: str, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.apply_speed_levers (with training.compile, which patches the attention for unpacked
    rows too) passes packed=False exactly for data.packing none, and finetune's collator for
    those rows omits an all-ones mask; packed rows keep PackingCollator."""
    from types import SimpleNamespace

    from llmtrain.config import load_config
    from llmtrain.train import run
    from tests.conftest import REPO

    cfg = load_config(
        REPO / "configs" / "demo.yaml", [f"data.packing={data_packing}", "training.compile=true"]
    )
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(packing, "patch_attention", lambda model, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(fused_ops, "compile_blocks", lambda model: 0)
    plan = SimpleNamespace(chunked_loss=False, reasons={"chunked_loss": "test"})
    assert run.apply_speed_levers(cfg, plan, tiny_llama()) is False  # type: ignore[arg-type]
    assert calls == [{"compiled_rope": True, "packed": packed}]
    inner = run.training_collator(cfg, pad_token_id=0).inner
    if packed:
        assert isinstance(inner, packing.PackingCollator)
    else:
        assert isinstance(inner, PadCollator) and inner.omit_full_mask
