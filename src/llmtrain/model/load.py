"""Loading models and tokenizers from a local directory or the hub cache (HF_HOME, offline)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from llmtrain import stack
from llmtrain.config import ModelSection
from llmtrain.errors import ConfigError
from llmtrain.model import support
from llmtrain.vocab import special_tokens

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _looks_local(path: str) -> bool:
    return path.startswith(("/", ".", "~")) or Path(path).exists() or path.count("/") > 1


def load_model_config(cfg: ModelSection) -> PretrainedConfig:
    """The model's config.json only: cheap, runs on a login node.

    Raises:
        ConfigError: it cannot be read, or the installed transformers would not read it as
            written (a newer model type or math key: model/support.py), exit 64.
    """
    path = cfg.resolved_path()
    if _looks_local(path) and not Path(path).expanduser().is_dir():
        raise ConfigError(
            f"model.path {cfg.path!r} is not a directory",
            "point model.path at a directory with config.json and weights, or at a hub id "
            "cached under HF_HOME",
        )
    try:
        support.check_model_config(support.config_dict(path, revision=cfg.revision), path=cfg.path)
        return AutoConfig.from_pretrained(
            path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"model.path {cfg.path!r} could not be read: {str(exc).splitlines()[0]}",
            "for a hub id, download it while online into HF_HOME (huggingface-cli download) and "
            "run with HF_HUB_OFFLINE=1; for custom code set model.trust_remote_code=true",
        ) from None


def pick_dtype(cfg: ModelSection) -> torch.dtype:
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def model_class(config: PretrainedConfig) -> type[PreTrainedModel] | None:
    try:
        cls: type[PreTrainedModel] = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
    return cls


def flash_attn_available(gpu: bool | None = None) -> bool:
    """flash_attn imports and the target (`gpu`; None: this machine) has a CUDA GPU."""
    has_gpu = torch.cuda.is_available() if gpu is None else gpu
    return importlib.util.find_spec("flash_attn") is not None and has_gpu


def pick_attention(cfg: ModelSection, config: PretrainedConfig, *, gpu: bool | None = None) -> str:
    """flash_attention_2 when flash_attn imports and the architecture has it, else sdpa, else
    eager. An explicit choice the architecture lacks is an error, not a silent fallback.
    `gpu`: whether the target machine has a CUDA GPU (validate on a login node checks for a
    GPU node); None: this machine."""
    cls = model_class(config)
    supports = {
        # 5.x renamed the flag (_supports_flash_attn); 4.37.2 has only _supports_flash_attn_2.
        "flash_attention_2": bool(
            cls
            and getattr(cls, "_supports_flash_attn_2", getattr(cls, "_supports_flash_attn", False))
        ),
        "sdpa": bool(cls and cls._supports_sdpa),
        "eager": True,
    }
    if cfg.attn_implementation != "auto":
        if not supports[cfg.attn_implementation]:
            raise ConfigError(
                f"model.attn_implementation={cfg.attn_implementation} is not supported for "
                f"{config.model_type} by transformers {stack.transformers_version()}",
                "use model.attn_implementation=auto",
            )
        if cfg.attn_implementation == "flash_attention_2" and not flash_attn_available(gpu):
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 needs the flash_attn package and a "
                "CUDA GPU, and this environment has no flash_attn or no GPU",
                "run inside the llmtrain image on a GPU node, or use "
                "model.attn_implementation=auto",
            )
        return cfg.attn_implementation
    if supports["flash_attention_2"] and flash_attn_available(gpu):
        choice = "flash_attention_2"
    elif supports["sdpa"]:
        choice = "sdpa"
    else:
        choice = "eager"
    log.info("attention: %s (model.attn_implementation=auto, %s)", choice, config.model_type)
    return choice


def load_tokenizer(cfg: ModelSection) -> PreTrainedTokenizerBase:
    """The tokenizer with `model.eos_token`/`model.pad_token` applied and padding decided.

    Raises:
        ConfigError: it cannot be loaded, its tokenizer.json does not parse with the installed
            tokenizers, or it has no EOS token (see special_tokens).
    """
    where = cfg.tokenizer or cfg.path
    support.check_tokenizer_file(
        support.tokenizer_file(cfg.resolved_tokenizer(), revision=cfg.revision), where=where
    )
    try:
        tok = AutoTokenizer.from_pretrained(
            cfg.resolved_tokenizer(), revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"tokenizer for {where!r} could not be loaded: "
            f"{str(exc).splitlines()[0]}",
            "check model.path / model.tokenizer and that the tokenizer files are cached",
        ) from None
    special_tokens.apply_overrides(tok, cfg)
    return tok


def load_model(
    cfg: ModelSection,
    *,
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
) -> PreTrainedModel:
    config = load_model_config(cfg)
    kwargs: dict[str, Any] = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        # 5.x renamed torch_dtype to dtype (the old name warns).
        ("dtype" if stack.is_current() else "torch_dtype"): dtype or pick_dtype(cfg),
        "attn_implementation": pick_attention(cfg, config),
        **(extra or {}),
    }
    return AutoModelForCausalLM.from_pretrained(cfg.resolved_path(), **kwargs)
