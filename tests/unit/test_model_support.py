"""A model directory the installed transformers would not read as written is refused before
loading (issue 19): model types newer than the pinned 4.37.2, config keys that change the math
which 4.37.2 ignores, and a tokenizer.json the pinned tokenizers cannot parse. The configs are
each family's real config.json fields; on the current stack the same directories are accepted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmtrain import stack
from llmtrain.config import ModelSection
from llmtrain.errors import ConfigError
from llmtrain.model import support
from llmtrain.model.load import load_model_config, load_tokenizer

LLAMA_3_2_1B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}
MISTRAL_NEMO: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 1024000,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 40,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 131072,
}
QWEN2_5_0_5B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
    "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_0_6B: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3072,
    "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
    "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_30B_A3B = {
    **QWEN3_0_6B, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 32,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "num_experts": 128,
    "num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1,
    "norm_topk_prob": True, "output_router_logits": False, "router_aux_loss_coef": 0.001,
    "mlp_only_layers": [], "tie_word_embeddings": False,
}
GEMMA_2_2B: dict[str, Any] = {
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304, "initializer_range": 0.02, "intermediate_size": 9216,
    "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "float32", "transformers_version": "4.42.4",
    "use_cache": True, "vocab_size": 256000,
}
GEMMA_3_1B: dict[str, Any] = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}
PHI_3_MINI: dict[str, Any] = {
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu",
    "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
    "max_position_embeddings": 4096, "model_type": "phi3", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.2",
    "use_cache": True, "vocab_size": 32064,
}
# As transformers 5.x saves a Llama: the RoPE base inside rope_parameters, no rope_theta.
LLAMA_SAVED_BY_5X = {
    **{k: v for k, v in LLAMA_3_2_1B.items() if k not in ("rope_scaling", "rope_theta",
                                                           "torch_dtype")},
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
    "dtype": "bfloat16", "transformers_version": "5.0.0",
}
QWEN2_5_YARN = {**QWEN2_5_0_5B, "rope_scaling": {"factor": 4.0, "type": "yarn",
                                                 "original_max_position_embeddings": 32768}}
LLAMA_MLP_BIAS = {**LLAMA_3_2_1B, "rope_scaling": None, "mlp_bias": True}

# name -> (config.json, words the pinned stack's refusal must contain)
PINNED_REFUSES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "Llama-3.2 rope_scaling llama3": (LLAMA_3_2_1B, ["rope_scaling", "llama3", ">=4.43.0"]),
    "Mistral-NeMo head_dim": (MISTRAL_NEMO, ["head_dim=128", "160"]),
    "Qwen3": (QWEN3_0_6B, ["'qwen3'", ">=4.51.0"]),
    "Qwen3-MoE": (QWEN3_30B_A3B, ["'qwen3_moe'", ">=4.51.0"]),
    "Gemma-2": (GEMMA_2_2B, ["'gemma2'", ">=4.42.0"]),
    "Gemma-3 (text)": (GEMMA_3_1B, ["'gemma3_text'", ">=4.50.0"]),
    "Phi-3": (PHI_3_MINI, ["'phi3'", ">=4.41.0"]),
    "Llama saved by transformers 5.x": (LLAMA_SAVED_BY_5X, ["rope_parameters", "RoPE base"]),
    "Qwen2.5 with YaRN": (QWEN2_5_YARN, ["rope_scaling", "yarn"]),
    "Llama with mlp_bias": (LLAMA_MLP_BIAS, ["mlp_bias=true"]),
}


def model_dir(tmp_path: Path, raw: dict[str, Any]) -> str:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(raw))
    return str(path)


@pytest.mark.parametrize("name", PINNED_REFUSES)
def test_newer_models_are_refused_on_the_pinned_stack_and_read_on_the_current(
    tmp_path: Path, name: str
) -> None:
    raw, words = PINNED_REFUSES[name]
    path = model_dir(tmp_path, raw)
    if stack.is_current():
        config = load_model_config(ModelSection(path=path))
        assert config.model_type == raw["model_type"]
        return
    with pytest.raises(ConfigError) as caught:
        load_model_config(ModelSection(path=path))
    message = caught.value.message()
    for word in [*words, "transformers 4.37.2", "make image STACK=current"]:
        assert word in message, (word, message)
    # The wrong fixes the old message gave for a model that only a newer release knows.
    assert "trust_remote_code" not in message
    assert "download" not in message


@pytest.mark.parametrize("raw", [QWEN2_5_0_5B, {**LLAMA_3_2_1B, "rope_scaling": None},
                                 {**LLAMA_3_2_1B, "rope_scaling": {"type": "linear",
                                                                   "factor": 2.0}}])
def test_what_both_stacks_read_is_accepted(tmp_path: Path, raw: dict[str, Any]) -> None:
    config = load_model_config(ModelSection(path=model_dir(tmp_path, raw)))
    assert config.num_attention_heads == raw["num_attention_heads"]


def test_a_type_with_its_own_code_is_pointed_at_trust_remote_code(tmp_path: Path) -> None:
    raw = {**QWEN2_5_0_5B, "model_type": "my_arch", "auto_map": {"AutoConfig": "x.MyConfig"}}
    with pytest.raises(ConfigError, match="trust_remote_code=true"):
        support.check_model_config(raw, path="m")


def test_the_table_names_each_type_the_installed_release_lacks() -> None:
    from transformers import CONFIG_MAPPING

    for model_type in ("gemma2", "gemma3_text", "qwen3", "qwen3_moe", "phi3", "gemma"):
        assert model_type in support.CAUSAL_LM_SINCE
        assert (model_type in CONFIG_MAPPING) == stack.is_current()


def bpe_tokenizer_json(merges: list[Any]) -> dict[str, Any]:
    vocab = {"a": 0, "b": 1, "ab": 2, "<unk>": 3}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": None, "post_processor": None, "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": merges},
    }


def test_merges_as_pairs_are_refused_where_tokenizers_cannot_parse_them(tmp_path: Path) -> None:
    """tokenizers 0.20 writes BPE merges as pairs; 0.15.2 fails on them with an opaque error."""
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(bpe_tokenizer_json([["a", "b"]])))
    if stack.at_least("tokenizers", "0.20"):
        support.check_tokenizer_file(path, where="m")
        return
    with pytest.raises(ConfigError) as caught:
        support.check_tokenizer_file(path, where="m")
    message = caught.value.message()
    assert "merges are stored as pairs" in message
    assert "STACK=current" in message
    # The form the pinned release writes still parses.
    path.write_text(json.dumps(bpe_tokenizer_json(["a b"])))
    support.check_tokenizer_file(path, where="m")


def test_load_tokenizer_checks_the_file_before_loading(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read by tokenizers"):
        load_tokenizer(ModelSection(path=str(tmp_path)))


def test_the_attention_choice_is_logged_once_per_process(caplog: pytest.LogCaptureFixture) -> None:
    """The checks and every model load asked again: the same line came 4 or 5 times a run (a
    newcomer's finding)."""
    import logging

    from llmtrain.model import load

    load._log_attention.cache_clear()
    cfg = ModelSection(path="embedded:tiny-llama")
    config = load_model_config(cfg)
    with caplog.at_level(logging.INFO, logger="llmtrain.model.load"):
        picks = {load.pick_attention(cfg, config) for _ in range(3)}
    assert len(picks) == 1
    lines = [r for r in caplog.records if r.getMessage().startswith("attention: ")]
    assert len(lines) == 1
