"""Loading trained results for inference and merging adapters, from directories on disk."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from llmtrain import compat
from llmtrain.config import ModelSection
from llmtrain.errors import ConfigError
from llmtrain.model import adapter_config, device, support
from llmtrain.model.load import load_model, load_tokenizer
from llmtrain.vocab import special_tokens

log = logging.getLogger(__name__)


def is_adapter_dir(path: Path) -> bool:
    return (path / adapter_config.CONFIG_NAME).is_file()


def adapter_tokenizer(base: ModelSection, adapter: Path) -> Any:
    """The tokenizer saved with the adapter (its vocabulary and template as trained), else the
    base's; loaded before the base model, so a tokenizer this stack refuses loads nothing.

    Raises:
        ConfigError: the tokenizer cannot be loaded (load.load_tokenizer; exit 64)."""
    saved = (adapter / "tokenizer_config.json").is_file()
    return load_tokenizer(base.model_copy(update={"tokenizer": str(adapter)}) if saved else base)


def load_for_inference(
    base: ModelSection,
    adapter: Path | None,
    *,
    dtype: torch.dtype | None = None,
    device_map: str | None = None,
    quantized: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer): a full model directory, or a base model plus a LoRA adapter.

    quantized: the base in 4-bit NF4 as QLoRA trained it, so the adapter sees the weights it
    was trained against (on a bf16 base the logits move by the quantization error).

    Raises:
        ConfigError: `adapter` is not a LoRA adapter directory, its adapter_config.json sets what
            the installed peft cannot compute (adapter_config.peft_config), or the base model or
            tokenizer cannot be loaded (load.load_model, load.load_tokenizer; exit 64)."""
    extra: dict[str, Any] = {"device_map": device_map} if device_map else {}
    if quantized:
        from llmtrain.model.methods import quantization_config

        # QLoRA's compute dtype as training planned it (plan.compute_dtype): bf16 where the GPU
        # computes in it, else fp16 (a V100 would emulate bf16 in fp32).
        compute = dtype or (torch.bfloat16 if device.native_bf16() else torch.float16)
        extra["quantization_config"] = quantization_config(compute)
        extra.setdefault("device_map", {"": 0})  # bitsandbytes places it; .to() is refused
    if adapter is None:
        model = load_model(base, dtype=dtype, extra=extra)
        tokenizer = load_tokenizer(base)
    else:
        from peft import PeftModel

        if not is_adapter_dir(adapter):
            raise ConfigError(
                f"{adapter} is not a LoRA adapter directory (no adapter_config.json)",
                "pass the final/adapter directory of a LoRA run, or omit --adapter for a full "
                "model",
            )
        # Both before the base: a refusal loads nothing.
        config = adapter_config.peft_config(adapter)
        tokenizer = adapter_tokenizer(base, adapter)
        compat.skip_unusable_bitsandbytes()
        model = PeftModel.from_pretrained(
            load_model(base, dtype=dtype, extra=extra), str(adapter), config=config
        )
        if (adapter / "generation_config.json").is_file():
            # The trained EOS (special_tokens.write_generation_config), not the base's.
            model.generation_config = GenerationConfig.from_pretrained(str(adapter))
    if "device_map" not in extra:
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    return model, tokenizer


def merge(base: ModelSection, adapter: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """Base plus adapter as one safetensors model directory with the tokenizer, written to a
    temporary name and renamed, so a crash never leaves a half merge under `out`.

    Raises:
        ConfigError: `adapter` is not a LoRA adapter directory, its adapter_config.json sets what
            the installed peft cannot compute (adapter_config.peft_config), or the base model or
            tokenizer cannot be loaded (exit 64)."""
    from peft import PeftModel

    if not is_adapter_dir(adapter):
        raise ConfigError(
            f"{adapter} is not a LoRA adapter directory (no adapter_config.json)",
            "pass the final/adapter directory of a LoRA run",
        )
    # Both before the base and before anything is written: a refusal (exit 64) leaves nothing.
    config = adapter_config.peft_config(adapter)
    tokenizer = adapter_tokenizer(base, adapter)
    compat.skip_unusable_bitsandbytes()
    model = PeftModel.from_pretrained(load_model(base, dtype=dtype), str(adapter), config=config)
    merged = model.merge_and_unload()
    trained = (
        GenerationConfig.from_pretrained(str(adapter))
        if (adapter / "generation_config.json").is_file()
        else merged.generation_config
    )
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        support.write_portable_tokenizer(tmp)  # readable by the pinned stack's tokenizers too
        special_tokens.write_generation_config(tmp, trained, tokenizer)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk or a signal: no half merge left
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("merged model written to %s", out)
    return out
