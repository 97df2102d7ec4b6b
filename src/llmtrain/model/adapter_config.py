"""Whether the installed peft reads an adapter's adapter_config.json as it was written, checked
before the base model is loaded (merge, generate --adapter, the samples after training).

peft writes every field of its config class into adapter_config.json, and peft 0.9.0 (the pinned
stack) builds the class from the file with all its keys: one key it does not know fails the load
with a TypeError. peft 0.21 (the current stack) writes 18 such keys into every LoRA adapter, each
saying "feature off" unless that feature was used (`alora_invocation_tokens: null`, `lora_bias:
false`). Later peft releases drop unknown keys with a warning instead, which loads silently wrong
when a key changes the math (LoRA on expert parameters, a LoRA bias, aLoRA).

So each key the installed config class lacks is dropped when its value turns its feature off,
and refused (exit 64) when it does not, naming the peft that wrote the adapter and the stack that
reads it. Where the installed peft knows every key nothing changes: peft reads the file itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtrain import stack
from llmtrain.errors import ConfigError

if TYPE_CHECKING:
    from peft import PeftConfig

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"

# Unknown keys that change nothing the adapter computes, whatever their value.
INERT_ANY_VALUE = {
    "peft_version",  # the release that wrote the file: provenance only
    "runtime_config",  # options of the process that runs the adapter; peft never saves it
}
# Companion keys: read only when their switch key has the given value, so any value is inert while
# it has another. peft 0.21 writes qalora_group_size=16 with use_qalora=false into every adapter;
# an initialization's *_config is read only under its init_lora_weights (peft 0.21 itself ignores
# it otherwise, with a warning).
COMPANIONS: dict[str, tuple[str, Any]] = {
    "qalora_group_size": ("use_qalora", True),
    "eva_config": ("init_lora_weights", "eva"),
    "corda_config": ("init_lora_weights", "corda"),
    "lora_ga_config": ("init_lora_weights", "lora_ga"),
}
# What each key peft 0.21 writes beyond peft 0.9.0 does when it is on, for the refusal. Each is off
# as peft 0.21 writes it by default (None, False, an empty list), which _inert drops.
WHY = {
    "alora_invocation_tokens": "Activated LoRA: the adapter acts only from these tokens on",
    "arrow_config": "Arrow routing between adapters",
    "corda_config": "CorDA initialization, which rewrites the base weights",
    "ensure_weight_tying": "the adapters of tied layers (embeddings, LM head) share weights",
    "eva_config": "EVA initialization, which may redistribute the ranks",
    "exclude_modules": "modules left out of the adapter, which would get adapter layers here",
    "kasa_config": "KaSA: the base weights truncated by an SVD, a learned diagonal in the adapter",
    "layer_replication": "the base model's layers stacked anew, each copy with its own adapter",
    "lora_bias": "a trained bias on LoRA's B, which would be left out",
    "lora_ga_config": "LoRA-GA initialization, which rewrites the base weights",
    "monteclora_config": "Monte Carlo LoRA, variational sampling on the adapters",
    "qalora_group_size": "the group size QALoRA pools LoRA A's inputs by",
    "target_parameters": "LoRA on parameters (e.g. experts' weights), which would be left out",
    "trainable_token_indices": "trained rows of the embeddings, which would stay as the base's",
    "use_bdlora": "block-diagonal LoRA factors",
    "use_qalora": "QALoRA: LoRA A on pooled inputs",
    "velora_config": "VeLoRA, a LoRA variant with its own saved buffers",
}


def read(adapter: Path) -> dict[str, Any]:
    """The adapter_config.json of the adapter directory `adapter`, as a dict.

    Raises:
        ConfigError: the file cannot be read, is not a JSON object, or has no peft_type (exit 64).
    """
    path = adapter / CONFIG_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path} cannot be read as JSON ({exc})",
            "pass the final/adapter directory of a LoRA run, as training wrote it",
        ) from None
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise ConfigError(
            f"{path} is not a peft adapter config (no peft_type)",
            "pass the final/adapter directory of a LoRA run, as training wrote it",
        )
    return raw


def config_class(raw: Mapping[str, Any], *, adapter: Path) -> type[PeftConfig]:
    """The installed peft's config class for the peft_type of adapter_config.json `raw` (LORA:
    LoraConfig).

    Raises:
        ConfigError: the installed peft has no such adapter type (exit 64).
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls: type[PeftConfig] | None = PEFT_TYPE_TO_CONFIG_MAPPING.get(raw["peft_type"])
    if cls is None:
        raise ConfigError(
            f"adapter {adapter} has peft_type {raw['peft_type']!r}, which peft "
            f"{stack.installed('peft')} does not know",
            _fix(raw.get("peft_version")),
        )
    return cls


def known_keys(raw: Mapping[str, Any], *, adapter: Path) -> set[str]:
    """The fields of config_class (the keys the installed peft reads).

    Raises:
        ConfigError: as config_class (exit 64).
    """
    return _field_names(config_class(raw, adapter=adapter))


def _field_names(cls: type[PeftConfig]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def readable_keys(raw: Mapping[str, Any], known: set[str], *, adapter: Path) -> dict[str, Any]:
    """The keys of adapter_config.json `raw` to build the config from: every key in `known` (the
    installed config class's fields), and none of the others, each of which must be inert.

    Raises:
        ConfigError: an unknown key is set to a value that changes what the adapter computes,
            naming each such key, its value, the peft that wrote the file and the fix (exit 64).
    """
    unknown = sorted(set(raw) - known)
    refused = [key for key in unknown if not _inert(raw, key)]
    if refused:
        installed = stack.installed("peft")
        wrote = raw.get("peft_version")
        raise ConfigError(
            f"adapter {adapter} was written by {f'peft {wrote}' if wrote else 'a newer peft'} and "
            f"sets keys that peft {installed} does not know, which change what it computes:",
            _fix(wrote),
            problems=[
                f"{key}={json.dumps(raw[key])[:80]}: {WHY.get(key, 'a newer feature')}"
                for key in refused
            ],
        )
    if unknown:
        log.info(
            "adapter %s: dropped keys of a newer peft that are off as written: %s",
            adapter,
            ", ".join(unknown),
        )
    return {key: value for key, value in raw.items() if key in known}


def peft_config(adapter: Path) -> PeftConfig | None:
    """The config to pass as PeftModel.from_pretrained(config=...) for the adapter directory
    `adapter`: None when the installed peft knows every key of its adapter_config.json (peft reads
    the file itself), else the installed config class built from the keys it knows.

    Raises:
        ConfigError: as read, config_class and readable_keys (exit 64).
    """
    raw = read(adapter)
    cls = config_class(raw, adapter=adapter)
    kept = readable_keys(raw, _field_names(cls), adapter=adapter)
    return None if len(kept) == len(raw) else cls(**kept)


def _inert(raw: Mapping[str, Any], key: str) -> bool:
    """Whether unknown `key` of `raw` leaves the adapter's computation as without it."""
    if key in INERT_ANY_VALUE:
        return True
    if key in COMPANIONS:
        switch, on = COMPANIONS[key]
        if raw.get(switch) != on:
            return True
    value = raw[key]
    # Only the empty values: 0 == False in Python, and a number is a setting, not "off".
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


def _fix(wrote: Any) -> str:
    """Where the adapter loads: with the peft that wrote it (`wrote`, when the file names it)."""
    needs = f"peft>={wrote}" if wrote else "the newer peft that wrote it"
    if not stack.is_current():
        return f"load it where {needs} is installed; " + stack.CURRENT_IMAGE_HINT
    return f"load it where {needs} is installed"
