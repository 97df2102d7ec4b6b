"""Compute estimates against the GPT-3 paper's Table D.1 and the issue's seed numbers."""

from __future__ import annotations

import pytest

from llmtrain.sizing.compute import estimate_compute, flops_per_token, pf_days, training_flops
from llmtrain.sizing.memory import ModelShape, RunShape

# (model, parameters, training tokens, total train compute in FLOPs, in PF-days), Table D.1 of
# Brown et al. 2020, "Language Models are Few-Shot Learners" (6 FLOPs per parameter per token).
GPT3_TABLE = [
    ("GPT-3 Small", 125e6, 300e9, 2.25e20, 2.60),
    ("GPT-3 Medium", 356e6, 300e9, 6.41e20, 7.42),
    ("GPT-3 Large", 760e6, 300e9, 1.37e21, 15.8),
    ("GPT-3 XL", 1.32e9, 300e9, 2.38e21, 27.5),
    ("GPT-3 2.7B", 2.65e9, 300e9, 4.77e21, 55.2),
    ("GPT-3 6.7B", 6.66e9, 300e9, 1.20e22, 139.0),
    ("GPT-3 13B", 12.85e9, 300e9, 2.31e22, 268.0),
    ("GPT-3 175B", 174.6e9, 300e9, 3.14e23, 3640.0),
    ("BERT-Base", 109e6, 250e9, 1.64e20, 1.89),
    ("BERT-Large", 355e6, 250e9, 5.33e20, 6.16),
    ("RoBERTa-Base", 125e6, 2000e9, 1.50e21, 17.4),
    ("RoBERTa-Large", 355e6, 2000e9, 4.26e21, 49.3),
]


@pytest.mark.parametrize(("name", "params", "tokens", "flops", "days"), GPT3_TABLE)
def test_gpt3_table_row(name: str, params: float, tokens: float, flops: float, days: float) -> None:
    got = training_flops(params, tokens)
    # the table prints three significant digits
    assert got == pytest.approx(flops, rel=5e-3), name
    assert pf_days(got) == pytest.approx(days, rel=5e-3), name


def test_t5_rows_use_half_the_parameters_per_token() -> None:
    # T5's encoder-decoder activates half its parameters per token: 3 FLOPs/param/token.
    assert training_flops(11e9, 1000e9, 3.0) == pytest.approx(3.30e22, rel=5e-3)
    assert pf_days(training_flops(3e9, 1000e9, 3.0)) == pytest.approx(104.0, rel=5e-3)


LLAMA_7B = ModelShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32,
                      vocab=32000)


def test_full_training_is_six_n_plus_attention() -> None:
    run = RunShape(method="full", seq_len=4096)
    per_token = flops_per_token(LLAMA_7B, run)
    assert per_token == 6 * LLAMA_7B.params + 12 * 32 * 4096 * 4096


def test_lora_skips_weight_gradients_of_frozen_weights() -> None:
    full = flops_per_token(LLAMA_7B, RunShape(method="full", seq_len=2048))
    lora = flops_per_token(LLAMA_7B, RunShape(method="lora", seq_len=2048, lora_r=16))
    assert 0.66 < lora / full < 0.70  # 4N + tiny, against 6N


def test_time_gpu_hours_and_pf_days() -> None:
    run = RunShape(method="full", seq_len=2048, gpus_per_node=8, nodes=2)
    est = estimate_compute(LLAMA_7B, run, tokens=1e9, peak_tflops=989.0, mfu=0.4)
    assert est.flops == flops_per_token(LLAMA_7B, run) * 1e9
    assert est.seconds == pytest.approx(est.flops / (16 * 989e12 * 0.4))
    assert est.gpu_hours == pytest.approx(est.seconds * 16 / 3600)
    assert est.pf_days == pytest.approx(est.flops / 8.64e19)
