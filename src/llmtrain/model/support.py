"""Whether the installed transformers and tokenizers read a model directory as it was written,
checked on the raw config.json and tokenizer.json before any config class or weight is built.

A model saved for a newer transformers either fails in the pinned stack with a message that
suggests the wrong fix (download it, or trust_remote_code), or, worse, loads silently wrong:
transformers 4.37.2 ignores `rope_parameters` (5.x keeps rope_theta there) and runs with the
default RoPE base, derives head_dim from hidden_size/heads (Mistral-NeMo's differs), and builds
no MLP bias for `mlp_bias: true`. Each such key is refused here, naming the release that reads
it and the current stack, so `validate` and `finetune` exit 64 before loading anything.

The rules compare against the installed library (its config classes' arguments, its model-type
table, its RoPE registry), so the same checks pass on the current stack where the keys are read.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from llmtrain import stack
from llmtrain.errors import ConfigError
from llmtrain.model.model_types import CAUSAL_LM_SINCE

# Config keys that change the model's computation, with the value under which a class that does
# not read the key computes the same thing ("derived": compared by a rule in _neutral).
MATH_KEYS: dict[str, Any] = {
    "head_dim": "derived",  # hidden_size / num_attention_heads
    "rope_parameters": "derived",  # rope_theta and rope_scaling of transformers 5.x
    "rope_scaling": None,
    "mlp_bias": False,
    "attention_bias": False,
    "layer_types": "derived",  # every layer full attention
    "partial_rotary_factor": 1.0,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "query_pre_attn_scalar": "derived",  # head_dim
    "use_qk_norm": False,
    "qk_layernorm": False,
    "no_rope_layers": None,
}
# RoPE scaling types transformers 4.37.2 implements (Llama, Falcon, GPT-NeoX, Phi, Persimmon;
# exactly {type, factor}); newer types and the first release with the shared RoPE registry.
PINNED_ROPE_TYPES = ("linear", "dynamic")
ROPE_TYPE_SINCE = {"llama3": "4.43.0", "yarn": "4.45.0", "longrope": "4.45.0"}


def config_dict(path: str, *, revision: str | None) -> dict[str, Any]:
    """The raw config.json of a local directory or a cached hub id (no class is built).

    Raises:
        OSError, ValueError: as transformers' own reader (the caller words them).
    """
    from transformers import PretrainedConfig

    raw, _ = PretrainedConfig.get_config_dict(path, revision=revision)
    return raw


def tokenizer_file(name: str, *, revision: str | None) -> Path | None:
    """The tokenizer.json of a local directory or a cached hub id; None when there is none."""
    local = Path(name).expanduser()
    if local.is_dir():
        found = local / "tokenizer.json"
        return found if found.is_file() else None
    from transformers.utils import cached_file

    try:
        cached = cached_file(
            name,
            "tokenizer.json",
            revision=revision,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except (OSError, ValueError):  # not cached: the tokenizer loader words that error
        return None
    return Path(cached) if cached else None


def check_model_config(raw: Mapping[str, Any], *, path: str) -> None:
    """Refuse a config.json the installed transformers would not read as written.

    Args:
        raw: the config.json as a dict (see config_dict).
        path: model.path as the user wrote it, for the message.

    Raises:
        ConfigError: its model type is unknown to the installed transformers, or it sets a key
            that changes the model's math which the installed config class ignores (exit 64).
    """
    if "model_type" not in raw:  # old checkpoints: AutoConfig guesses the type from the name
        return
    model_type = str(raw["model_type"])
    cls = _config_class(model_type)
    if cls is None:
        _refuse_model_type(raw, path)
        return
    read = _read_keys(cls, model_type)
    if "rope_parameters" in read:  # 5.x folds rope_theta and rope_scaling into it on load
        read |= {"rope_theta", "rope_scaling"}
    for key, neutral in MATH_KEYS.items():
        if key in raw and key not in read and not _neutral(raw, key, neutral):
            _refuse_key(raw, path, key, model_type)
    if raw.get("rope_scaling") and ("rope_scaling" in read or "rope_parameters" in read):
        _check_rope_scaling(raw["rope_scaling"], path, model_type)


def check_tokenizer_file(path: Path | None, *, where: str) -> None:
    """Refuse a tokenizer.json that the installed tokenizers library cannot parse.

    Args:
        path: the tokenizer.json file; None when the tokenizer has none (nothing to check).
        where: model.path / model.tokenizer as the user wrote it, for the message.

    Raises:
        ConfigError: the file does not parse (exit 64), naming the cause where it is known.
    """
    if path is None:
        return
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a bare Exception for any parse error
        release = stack.installed("tokenizers")
        cause = _tokenizer_cause(path) or f"tokenizers says: {str(exc).splitlines()[0]}"
        raise ConfigError(
            f"the tokenizer.json of {where!r} cannot be read by tokenizers {release}: {cause}",
            stack.CURRENT_IMAGE_HINT
            if not stack.is_current()
            else "re-save the tokenizer with the library version that wrote it",
        ) from None


def _tokenizer_cause(path: Path) -> str | None:
    """The known reason a newer tokenizer.json does not parse in older tokenizers, if seen."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"it is not valid JSON ({exc})"
    merges = (data.get("model") or {}).get("merges") or []
    if merges and isinstance(merges[0], list):
        return (
            "its BPE merges are stored as pairs, the format of tokenizers 0.20 and later "
            "(older releases read only 'a b' strings)"
        )
    return None


def write_portable_tokenizer(directory: Path) -> bool:
    """Rewrite the BPE merges of directory/tokenizer.json from pairs (["a", "b"], what tokenizers
    0.20 and later write) to "a b" strings, the format every tokenizers release reads, so what
    llmtrain saves on the current stack (adapters, models) loads on the pinned one's tokenizers
    0.15. The same merges in the same order: tokenizers 0.20+ read both forms alike. Left as
    they are when a piece holds a space ("a b" would split it wrongly) or there are no pair
    merges. Returns whether the file was rewritten."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    merges = (data.get("model") or {}).get("merges") or []
    if not (merges and isinstance(merges[0], list)):
        return False
    if any(" " in piece for pair in merges for piece in pair):
        return False
    data["model"]["merges"] = [" ".join(pair) for pair in merges]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return True


@cache
def _config_class(model_type: str) -> type[Any] | None:
    from transformers import CONFIG_MAPPING

    try:
        cls: type[Any] = CONFIG_MAPPING[model_type]
    except KeyError:
        return None
    return cls


def _read_keys(cls: type[Any], model_type: str) -> set[str]:
    """The config.json keys the installed release reads for `model_type`: its config class's
    arguments, and the MATH_KEYS its modeling code reads by name (5.x reads some with
    getattr(config, "head_dim", ...) without declaring them in the config class)."""
    read = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    source = _modeling_source(model_type)
    read |= {key for key in MATH_KEYS if f"config.{key}" in source or f'"{key}"' in source}
    return read


@cache
def _modeling_source(model_type: str) -> str:
    """The text of the installed modeling_<type>.py, read as a file (nothing is imported)."""
    import importlib.util

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    module = model_type_to_module_name(model_type)
    try:
        spec = importlib.util.find_spec(f"transformers.models.{module}.modeling_{module}")
    except ImportError:
        return ""
    if spec is None or spec.origin is None:
        return ""
    return Path(spec.origin).read_text(encoding="utf-8")


def _neutral(raw: Mapping[str, Any], key: str, neutral: Any) -> bool:
    """Whether `key`'s value computes the same as a class that ignores it."""
    value = raw[key]
    if neutral != "derived":
        return bool(value == neutral)
    heads = raw.get("num_attention_heads")
    derived_head_dim = raw["hidden_size"] // heads if heads and raw.get("hidden_size") else None
    if key == "head_dim":
        return value is None or value == derived_head_dim
    if key == "query_pre_attn_scalar":
        return value is None or value == raw.get("head_dim", derived_head_dim)
    if key == "layer_types":
        return value is None or all(t == "full_attention" for t in value)
    if key == "rope_parameters":
        # Neutral only when it repeats a top-level rope_theta with no scaling.
        return value is None or (
            isinstance(value, Mapping)
            and value.get("rope_type", "default") == "default"
            and "rope_theta" in raw
            and value.get("rope_theta", raw["rope_theta"]) == raw["rope_theta"]
        )
    raise AssertionError(key)


def _refuse_model_type(raw: Mapping[str, Any], path: str) -> None:
    model_type = raw.get("model_type")
    version = stack.transformers_version()
    since = CAUSAL_LM_SINCE.get(str(model_type))
    if since is not None:
        raise ConfigError(
            f"model.path {path!r} is a {model_type!r} model, which transformers {version} does "
            f"not know: it needs transformers>={since}",
            stack.CURRENT_IMAGE_HINT,
        )
    if "auto_map" in raw:  # the model ships its own code: running it is the user's call
        raise ConfigError(
            f"model.path {path!r} has model type {model_type!r}, which transformers {version} "
            "does not know; its config.json names its own code (auto_map)",
            "set model.trust_remote_code=true if you trust that code",
        )
    raise ConfigError(
        f"model.path {path!r} has model type {model_type!r}, which transformers {version} does "
        "not know",
        "use a decoder-only model transformers knows (llmtrain inspect lists what is supported), "
        "or if a newer transformers has it, " + stack.CURRENT_IMAGE_HINT,
    )


def _refuse_key(raw: Mapping[str, Any], path: str, key: str, model_type: str) -> None:
    version = stack.transformers_version()
    value = json.dumps(raw[key])
    why = {
        "rope_parameters": "it holds the RoPE base (rope_theta) and scaling as transformers 5.x "
        "saves them, and without it the model runs with the default RoPE base",
        "head_dim": f"it derives head_dim as hidden_size/num_attention_heads = "
        f"{raw.get('hidden_size', 0) // max(raw.get('num_attention_heads', 1) or 1, 1)}, "
        "so the attention shapes would be wrong",
        "rope_scaling": "it has no RoPE scaling for this architecture, so long-context scaling "
        "would be dropped",
    }.get(key, "so the model would compute something other than what was trained")
    raise ConfigError(
        f"model.path {path!r} sets {key}={value[:80]}, which transformers {version} ignores for "
        f"{model_type!r}: {why}",
        stack.CURRENT_IMAGE_HINT,
    )


def _check_rope_scaling(scaling: Any, path: str, model_type: str) -> None:
    """rope_scaling of a class that reads it: a type the installed release implements."""
    rope_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
    version = stack.transformers_version()
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError:  # before 4.45: each model validates {type, factor} itself
        implemented = rope_type in PINNED_ROPE_TYPES and set(scaling) == {"type", "factor"}
    else:
        implemented = rope_type in ROPE_INIT_FUNCTIONS or rope_type == "default"
    if implemented:
        return
    since = ROPE_TYPE_SINCE.get(str(rope_type))
    if since:
        need = f": it needs transformers>={since}"
    elif rope_type in PINNED_ROPE_TYPES:
        need = " in this form: it reads exactly the keys type and factor"
    else:
        need = ""
    raise ConfigError(
        f"model.path {path!r} sets rope_scaling of type {rope_type!r} "
        f"({json.dumps(scaling)[:120]}), which transformers {version} does not implement for "
        f"{model_type!r}{need}",
        stack.CURRENT_IMAGE_HINT,
    )
