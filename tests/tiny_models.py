"""Tiny random models built from real architectures' configs; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
)

COMMON = {"vocab_size": 128, "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 3}


def tiny_config(arch: str) -> PretrainedConfig:
    if arch == "llama":
        return LlamaConfig(**COMMON, intermediate_size=64, num_key_value_heads=2)
    if arch == "mistral":
        return MistralConfig(**COMMON, intermediate_size=64, num_key_value_heads=2)
    if arch == "mixtral":
        return MixtralConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                             num_local_experts=4, num_experts_per_tok=2)
    if arch == "qwen2":
        return Qwen2Config(**COMMON, intermediate_size=64, num_key_value_heads=2)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**COMMON, intermediate_size=64)
    if arch == "falcon":
        return FalconConfig(vocab_size=128, hidden_size=32, num_attention_heads=4,
                            num_hidden_layers=3, new_decoder_architecture=True, num_kv_heads=2)
    if arch == "gpt2":
        return GPT2Config(vocab_size=128, n_embd=32, n_head=4, n_layer=3, n_positions=64)
    raise ValueError(arch)


def tiny_model(arch: str, seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForCausalLM.from_config(tiny_config(arch))
    return model


def tiny_checkpoint(arch: str, path: Path) -> PretrainedConfig:
    """A tiny random model of `arch` saved at `path` with the embedded tiny-llama tokenizer (the
    vocab sized to it), as validate reads a model directory; returns its config."""
    from transformers import AutoTokenizer

    config = tiny_config(arch)
    config.vocab_size = 512  # the embedded tokenizer's
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer = Path(__file__).resolve().parents[1] / "src" / "llmtrain" / "embedded" / "tiny-llama"
    AutoTokenizer.from_pretrained(str(tokenizer)).save_pretrained(path)
    return config
