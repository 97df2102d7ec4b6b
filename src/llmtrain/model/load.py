"""Loading models and tokenizers from a local directory or the hub cache (HF_HOME, offline)."""

from __future__ import annotations

import functools
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
from llmtrain.model import device, support
from llmtrain.plan import Hardware, choose_attention
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
    """model.dtype, or for auto the 16-bit dtype this GPU computes in (fp16 on a V100 or T4,
    as a LoRA run there holds its frozen base: generate and the post-run samples then fit
    where training did), fp32 without a GPU."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if device.native_bf16():
        return torch.bfloat16
    return torch.float16 if torch.cuda.is_available() else torch.float32


def model_class(config: PretrainedConfig) -> type[PreTrainedModel] | None:
    try:
        cls: type[PreTrainedModel] = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None
    return cls


def attention_support(config: PretrainedConfig) -> dict[str, bool]:
    """Attention implementation -> the architecture has it in transformers 4.37.2."""
    cls = model_class(config)
    return {
        # 5.x renamed the flag (_supports_flash_attn); 4.37.2 has only _supports_flash_attn_2.
        "flash_attention_2": bool(
            cls
            and getattr(cls, "_supports_flash_attn_2", getattr(cls, "_supports_flash_attn", False))
        ),
        "sdpa": bool(cls and cls._supports_sdpa),
        "eager": True,
    }


def pick_attention(
    cfg: ModelSection, config: PretrainedConfig, *, target: Hardware | None = None
) -> str:
    """flash_attention_2 when flash_attn is usable and the architecture has it, else sdpa, else
    eager (plan.choose_attention decides). `target`: the machine checked for (validate on a
    login node checks for a GPU node); None: this one (device.this_machine).

    Raises:
        ConfigError: an explicit choice the architecture lacks, or flash_attention_2 without
            flash_attn and a GPU that runs it (exit 64), not a silent fallback.
    """
    choice, reason = choose_attention(
        cfg.attn_implementation,
        attention_support(config),
        device.this_machine() if target is None else target,
        config.model_type,
    )
    _log_attention(choice, reason)
    return choice


@functools.cache
def _log_attention(choice: str, reason: str) -> None:
    """Once per process: the checks and each model load (the base model's answers before
    training, training, the answers after) ask again, and the line came 4 or 5 times a run."""
    log.info("attention: %s (%s)", choice, reason)


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
    attn_implementation: str | None = None,
    extra: dict[str, Any] | None = None,
) -> PreTrainedModel:
    """The model's weights; `dtype` and `attn_implementation` as a RunPlan decided them (None:
    decided here, for inference). Raises ConfigError (exit 64) as load_model_config does."""
    kwargs: dict[str, Any] = {
        "revision": cfg.revision,
        "trust_remote_code": cfg.trust_remote_code,
        # 5.x renamed torch_dtype to dtype (the old name warns).
        ("dtype" if stack.is_current() else "torch_dtype"): dtype or pick_dtype(cfg),
        "attn_implementation": attn_implementation
        or pick_attention(cfg, load_model_config(cfg)),
        **(extra or {}),
    }
    return AutoModelForCausalLM.from_pretrained(cfg.resolved_path(), **kwargs)
