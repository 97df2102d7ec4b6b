"""The model families users fine-tune today, end to end through the real CLI on the current stack
(transformers 5.x, peft 0.2x): Llama-3.x, Qwen2.5, Qwen3, Gemma-2, Gemma-3 (text), Phi-3/Phi-4,
Mistral-NeMo, Mixtral, Qwen2-MoE and Qwen3-MoE.

Each checkpoint is built here: the family's real config.json (tests/unit/test_model_support.py
holds most of them) scaled down to hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128,
keeping the fields that change the math (Llama-3's rope_scaling llama3, Qwen2.5's q/k/v bias,
Qwen3's q/k norms and head_dim, Gemma's soft-capping, sliding window and head_dim, Mistral-NeMo's
head_dim != hidden/heads, tied embeddings, the experts of the MoE families), random weights saved
by the installed transformers, and the embedded tiny-llama tokenizer (vocab 512).

Per family: `finetune` with LoRA, target_modules auto and merge exits 0, the logged loss falls,
final/merged has the logits of the base plus the adapter, and `generate` answers with the
adapter. The MoE families' routed experts are fused 3-D parameters in transformers 5.x, which
LoRA cannot adapt as Linear layers: auto adapts their attention and dense linears only
(methods.LORA_TARGETS), and the test checks which layers were adapted; lora.target_parameters
adapts the experts (peft's LoRA on parameters). Per family `finetune` with method full trains
every weight, and method layers (two families) only the last block's.

On the pinned stack (transformers 4.37.2) these model types or their 5.x checkpoints cannot be
built, so the training tests skip; the two families whose model type 4.37.2 knows but whose
published config it would misread (Llama-3.x's rope_scaling llama3, Mistral-NeMo's head_dim), and
Qwen2-MoE (a model type 4.37.2 lacks, not in tests/unit/test_model_support.py), are checked to
make `finetune` exit 64 before loading anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from llmtrain import stack
from tests.conftest import REPO, run_cli
from tests.e2e.test_finetune_cli import losses
from tests.unit.test_model_support import (
    GEMMA_2_2B,
    GEMMA_3_1B,
    LLAMA_3_2_1B,
    MISTRAL_NEMO,
    PHI_3_MINI,
    QWEN2_5_0_5B,
    QWEN3_0_6B,
    QWEN3_30B_A3B,
)

pytestmark = pytest.mark.slow

TOKENIZER = REPO / "src" / "llmtrain" / "embedded" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

MIXTRAL_8X7B: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
QWEN1_5_MOE_A2_7B: dict[str, Any] = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5632,
    "max_position_embeddings": 8192,
    "max_window_layers": 21,
    "model_type": "qwen2_moe",
    "moe_intermediate_size": 1408,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 16,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.39.0.dev0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# The sizes every family shrinks to; the special token ids are the embedded tokenizer's.
SMALL: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 512,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "torch_dtype": "float32",
}
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
GATED_MLP = {"gate_proj", "up_proj", "down_proj"}

# name -> (the real config.json, what scaling keeps family-specific, the layers LoRA auto adapts)
FAMILIES: dict[str, tuple[dict[str, Any], dict[str, Any], set[str]]] = {
    # head_dim 64 = 2048/32 in the real one: 16 = 64/4 here; rope_scaling llama3 kept as is.
    "Llama-3.2": (LLAMA_3_2_1B, {"head_dim": 16}, ATTENTION | GATED_MLP),
    "Qwen2.5": (QWEN2_5_0_5B, {}, ATTENTION | GATED_MLP),
    # head_dim 128 != 1024/16: 32 != 64/4
    "Qwen3": (QWEN3_0_6B, {"head_dim": 32}, ATTENTION | GATED_MLP),
    # head_dim 256 != 2304/8, query_pre_attn_scalar = head_dim; a window shorter than a sample
    "Gemma-2": (
        GEMMA_2_2B,
        {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8},
        ATTENTION | GATED_MLP,
    ),
    # one sliding and one full layer out of two (the real one: 5 of every 6)
    "Gemma-3 (text)": (
        GEMMA_3_1B,
        {
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 8,
            "sliding_window_pattern": 2,
        },
        ATTENTION | GATED_MLP,
    ),
    # Phi-4 is model type phi3 with grouped KV heads, as SMALL has them
    "Phi-3/Phi-4": (PHI_3_MINI, {}, {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
    # head_dim 128 != 5120/32: 32 != 64/4
    "Mistral-NeMo": (MISTRAL_NEMO, {"head_dim": 32}, ATTENTION | GATED_MLP),
    # The routed experts are fused parameters in 5.x: attention only.
    "Mixtral": (MIXTRAL_8X7B, {"num_local_experts": 4, "num_experts_per_tok": 2}, ATTENTION),
    # ... plus the shared expert's MLP.
    "Qwen2-MoE": (
        QWEN1_5_MOE_A2_7B,
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 128,
        },
        ATTENTION | GATED_MLP,
    ),
    "Qwen3-MoE": (
        QWEN3_30B_A3B,
        {"head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
        ATTENTION,
    ),
}
# The pinned stack's refusal through the CLI, with the words it must contain: the families whose
# model type transformers 4.37.2 knows but whose published config it would misread, and the one
# newer model type tests/unit/test_model_support.py does not cover.
PINNED_REFUSALS = {
    "Llama-3.2": ["rope_scaling", "'llama3'", ">=4.43.0"],
    "Mistral-NeMo": ["head_dim=32", "= 16"],
    "Qwen2-MoE": ["'qwen2_moe'", ">=4.40.0"],
}
# Fast settings on top of configs/demo.yaml: ~10 steps at a high learning rate.
SETTINGS = [
    "method.name=lora",
    "lora.target_modules=auto",
    "training.max_steps=10",
    "training.learning_rate=1e-2",
    "training.warmup_ratio=0",
    "training.logging_steps=1",
    "training.save_steps=100",
    "training.report_to=[none]",
    "generation.samples=0",
    "output.merge=true",
]
IDS = [[1, 5, 17, 42, 99, 7, 250, 3, 64, 11, 300, 12]]  # longer than the sliding window of 8


def scaled_config(name: str) -> dict[str, Any]:
    """The family's config.json (as published) at the test's size."""
    real, kept, _ = FAMILIES[name]
    drop = ("architectures", "transformers_version", "cache_implementation")
    return {**{k: v for k, v in real.items() if k not in drop}, **SMALL, **kept}


def with_tokenizer(path: Path) -> Path:
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER / name, path / name)
    return path


def build_checkpoint(name: str, path: Path) -> Path:
    """Random weights of the scaled family, saved by the installed transformers."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = scaled_config(name)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).save_pretrained(path)
    return with_tokenizer(path)


def saved_keeps_the_math(name: str, saved: dict[str, Any]) -> None:
    """The checkpoint as written still carries what makes the family what it is."""
    _, kept, _ = FAMILIES[name]
    for key, value in kept.items():
        if key in saved:  # some are folded into other keys (sliding_window_pattern)
            assert saved[key] == value, (key, saved[key])
    if name == "Llama-3.2":
        assert saved["rope_parameters"]["rope_type"] == "llama3", saved
    if name == "Gemma-2":
        assert (saved["attn_logit_softcapping"], saved["final_logit_softcapping"]) == (50.0, 30.0)
        assert "sliding_attention" in saved["layer_types"]
    if name == "Gemma-3 (text)":
        assert set(saved["layer_types"]) == {"sliding_attention", "full_attention"}
    assert saved["vocab_size"] == 512 and saved["bos_token_id"] == 1


def logits(model_dir: Path, adapter: Path | None = None) -> Any:
    """Logits of IDS from transformers and peft alone (no llmtrain loader)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(IDS)).logits


def adapted_layers(adapter: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    return {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys if ".lora_" in k}


@pytest.mark.parametrize("name", FAMILIES)
def test_family_fine_tunes_merges_and_generates(name: str, tmp_path: Path) -> None:
    if not stack.is_current():
        refusal = (
            "test_pinned_stack_refuses_before_loading"
            if name in PINNED_REFUSALS
            else "tests/unit/test_model_support.py"
            if FAMILIES[name][0]["model_type"] not in ("qwen2", "mixtral")
            else "none: 4.37.2 trains this model type itself"
        )
        pytest.skip(
            f"{name}: a checkpoint saved by transformers 5.x cannot be built with the pinned "
            f"transformers 4.37.2 (the pinned stack's refusal of the family: {refusal})"
        )
    import torch

    base = build_checkpoint(name, tmp_path / "base")
    saved_keeps_the_math(name, json.loads((base / "config.json").read_text()))
    out = tmp_path / "run"
    result = run_cli(
        "finetune", "configs/demo.yaml", f"model.path={base}", f"output.dir={out}", *SETTINGS
    )
    assert result.returncode == 0, result.stderr[-3000:]
    values = losses(out)
    print(f"{name}: loss {values[0]:.3f} -> {values[-1]:.3f}")  # shown by pytest -rP
    assert len(values) == 10 and values[-1] < values[0] - 0.3, values
    adapter, merged = out / "final" / "adapter", out / "final" / "merged"
    assert adapted_layers(adapter) == FAMILIES[name][2]

    with_adapter = logits(base, adapter)
    merged_logits = logits(merged)
    assert torch.allclose(with_adapter, merged_logits, atol=1e-4), (
        (with_adapter - merged_logits).abs().max()
    )
    assert (with_adapter - logits(base)).abs().max() > 1e-2  # the adapter changed the model

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Question: What is 1 plus 1?\\nAnswer:"}\n')
    answers = tmp_path / "answers.jsonl"
    result = run_cli(
        "generate",
        "configs/demo.yaml",
        f"model.path={base}",
        "generation.max_new_tokens=4",
        "--adapter",
        str(adapter),
        "--prompts",
        str(prompts),
        "--out",
        str(answers),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = [json.loads(x) for x in answers.read_text().splitlines()]
    assert record["prompt"].endswith("Answer:") and isinstance(record["output"], str)


# method layers shares full's path but for which weights train: two families whose blocks differ
# most (Gemma-2's sliding windows and tied embeddings, Qwen3-MoE's experts) keep CI's time down.
@pytest.mark.parametrize(
    ("name", "method"),
    [(name, "full") for name in FAMILIES] + [("Gemma-2", "layers"), ("Qwen3-MoE", "layers")],
)
def test_family_trains_full_and_layers(name: str, method: str, tmp_path: Path) -> None:
    """method full and method layers (last:1) train the family: the loss falls, and the saved
    model, read by transformers alone, differs from the base in exactly the trained weights."""
    if not stack.is_current():
        pytest.skip(f"{name}: built by the current stack only (see the LoRA test's reason)")
    import torch
    from transformers import AutoModelForCausalLM

    base = build_checkpoint(name, tmp_path / "base")
    out = tmp_path / "run"
    result = run_cli(
        "finetune", "configs/demo.yaml", f"model.path={base}", f"output.dir={out}",
        *[s for s in SETTINGS if not s.startswith(("method.", "lora.", "output.merge"))],
        f"method.name={method}", *(["method.layers=[last:1]"] if method == "layers" else []),
        "training.max_steps=6",
        "training.learning_rate=3e-3", "data.eval_fraction=0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    values = losses(out)
    assert len(values) == 6 and values[-1] < values[0], values
    before, after = (
        dict(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).named_parameters())
        for d in (base, out / "final" / "model")
    )
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    last = f"model.layers.{SMALL['num_hidden_layers'] - 1}."
    trained = set(before) if method == "full" else {n for n in before if n.startswith(last)}
    # A weight whose gradient is zero in 6 steps (none here, all are used) would stay equal.
    assert changed == trained, sorted(changed ^ trained)


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.mark.parametrize("name", ["Mixtral", "Qwen3-MoE"])
def test_lora_target_parameters_adapt_the_experts(name: str, tmp_path: Path) -> None:
    """lora.target_parameters: peft's LoRA on parameters adapts the fused 3-D expert weights
    beside auto's linears. The loss falls, every layer's expert weights carry an adapter, the merged
    model has the logits of the base plus the adapter, and the merge changed the expert weights
    (and nothing but what LoRA adapts)."""
    if not stack.is_current():
        pytest.skip(
            "peft 0.9.0 has no target_parameters: the pinned stack refuses it "
            "(tests/unit/test_target_parameters.py)"
        )
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base = build_checkpoint(name, tmp_path / "base")
    out = tmp_path / "run"
    result = run_cli(
        "finetune", "configs/demo.yaml", f"model.path={base}", f"output.dir={out}", *SETTINGS,
        f"lora.target_parameters=[{','.join(EXPERTS)}]", "lora.dropout=0",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    values = losses(out)
    assert len(values) == 10 and values[-1] < values[0] - 0.3, values
    adapter, merged = out / "final" / "adapter", out / "final" / "merged"
    saved = json.loads((adapter / "adapter_config.json").read_text())["target_parameters"]
    assert sorted(saved) == sorted(EXPERTS)
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # peft nests one wrapper per parameter: experts and experts.base_layer
    for i in range(SMALL["num_hidden_layers"]):
        for wrapper in ("experts", "experts.base_layer"):
            assert f"base_model.model.model.layers.{i}.mlp.{wrapper}.lora_A.weight" in keys, keys

    with_adapter = logits(base, adapter)
    assert torch.allclose(with_adapter, logits(merged), atol=1e-4)
    before, after = (
        dict(AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).named_parameters())
        for d in (base, merged)
    )
    # q_proj.weight -> q_proj; experts.gate_up_proj (a parameter of its own) -> gate_up_proj
    changed = {
        n.split(".")[-2] if n.endswith((".weight", ".bias")) else n.split(".")[-1]
        for n in before
        if not torch.equal(before[n], after[n])
    }
    assert changed == {"gate_up_proj", "down_proj"} | FAMILIES[name][2], changed

    # generate reloads the adapter, expert adapters included, onto the base
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Question: What is 1 plus 1?\\nAnswer:"}\n')
    answers = tmp_path / "answers.jsonl"
    result = run_cli(
        "generate", "configs/demo.yaml", f"model.path={base}", "generation.max_new_tokens=4",
        "--adapter", str(adapter), "--prompts", str(prompts), "--out", str(answers),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (record,) = [json.loads(x) for x in answers.read_text().splitlines()]
    assert record["prompt"].endswith("Answer:") and isinstance(record["output"], str)


@pytest.mark.parametrize("name", PINNED_REFUSALS)
def test_pinned_stack_refuses_before_loading(name: str, tmp_path: Path) -> None:
    """The published config.json (scaled) with the tokenizer and no weights: the pinned stack
    exits 64 on the config alone, naming the key and the current stack, and writes nothing."""
    if stack.is_current():
        pytest.skip(
            f"{name}: the current stack trains it (test_family_fine_tunes_merges_and_generates)"
        )
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(scaled_config(name)))
    with_tokenizer(base)
    out = tmp_path / "run"
    result = run_cli(
        "finetune", "configs/demo.yaml", f"model.path={base}", f"output.dir={out}", *SETTINGS
    )
    assert result.returncode == 64, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for word in [*PINNED_REFUSALS[name], "transformers 4.37.2", "make image STACK=current"]:
        assert word in result.stderr, (word, result.stderr[-2000:])
    assert not out.exists()


@pytest.mark.parametrize("name", ["Mixtral", "Qwen2-MoE", "Qwen3-MoE"])
def test_estimate_says_it_does_not_cover_a_mixture_of_experts(name: str, tmp_path: Path) -> None:
    """The memory estimator counts a dense Llama-style decoder: for a mixture of experts it says
    so (exit 64) instead of printing a number."""
    if not stack.is_current():
        pytest.skip(
            f"{name}: built by the current stack only (the pinned stack's Mixtral: "
            "tests/e2e/test_bad_input_config.py::test_estimate_says_it_does_not_cover_a_mixture_"
            "of_experts)"
        )
    base = build_checkpoint(name, tmp_path / "base")
    result = run_cli("estimate", "configs/demo.yaml", f"model.path={base}")
    assert result.returncode == 64, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    model_type = FAMILIES[name][0]["model_type"]
    assert f"model type {model_type!r} is a mixture of experts" in result.stderr
    assert "does not cover this architecture" in result.stderr
    assert "GiB" not in result.stdout
