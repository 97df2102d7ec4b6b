"""How a model is wrapped for each method; the training loop is the same for all of them."""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from llmtrain import compat
from llmtrain.config import LoraSection, MethodSection
from llmtrain.errors import ConfigError

log = logging.getLogger(__name__)

# The attention and MLP linear layers per architecture (module names as in transformers 4.37.2).
LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the linear layers, the names LoRA's target_modules match."""
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D)
    }
    return sorted(names)


def lora_targets(config: PretrainedConfig, lora: LoraSection, model: nn.Module) -> list[str]:
    """The module names LoRA adapts: lora.target_modules, or for auto the attention and MLP linears
    of the architecture (LORA_TARGETS).

    Raises:
        ConfigError: a listed target is not a linear layer of the model, or auto meets an
            architecture it does not know (exit 64)."""
    if lora.target_modules != "auto":
        present = set(linear_module_names(model))
        missing = [t for t in lora.target_modules if t not in present]
        if missing:
            raise ConfigError(
                f"lora.target_modules {missing} are not linear layers of this "
                f"{config.model_type} model",
                f"choose from: {', '.join(sorted(present))}",
            )
        return list(lora.target_modules)
    if config.model_type not in LORA_TARGETS:
        raise ConfigError(
            f"lora.target_modules=auto does not know the architecture {config.model_type!r}",
            "set lora.target_modules to a list of its linear layers: "
            + ", ".join(linear_module_names(model)),
        )
    return LORA_TARGETS[config.model_type]


def check_dora_targets(model: nn.Module, targets: list[str]) -> None:
    """peft 0.9.0's DoRA adds W + scaling * B A with W as stored: a Conv1D weight (GPT-2) is
    stored transposed, so the shapes clash (or, when square, the norm is taken the wrong way).

    Raises ConfigError naming the Conv1D targets; `model` may be on the meta device."""
    conv = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets
        }
    )
    if conv:
        raise ConfigError(
            f"lora.use_dora=true: the targets {conv} of this model are Conv1D layers "
            "(GPT-2 style, weights stored transposed), which peft 0.9.0's DoRA cannot adapt",
            "set lora.use_dora=false for this architecture (DoRA works on nn.Linear layers)",
        )


def _decoder_blocks(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ConfigError(
        "method.layers 'last:N' could not find the transformer blocks of this model",
        "name the layers with parameter-name globs instead, e.g. 'model.layers.11.*'",
    )


def select_parameters(model: PreTrainedModel, patterns: list[str]) -> set[str]:
    """Parameter names chosen by 'last:N', 'embeddings', 'lm_head' or globs over names.

    Raises:
        ConfigError: a pattern matches no parameter, or last:N has N not a positive integer or more
            than the model's blocks (exit 64)."""
    names = [n for n, _ in model.named_parameters()]
    module_params = {id(p): n for n, p in model.named_parameters()}
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern.startswith("last:"):
            count = pattern.removeprefix("last:")
            if not count.isdigit() or int(count) < 1:
                raise ConfigError(
                    f"method.layers {pattern!r}: N must be a positive integer", "e.g. 'last:2'"
                )
            prefix, blocks = _decoder_blocks(model)
            if int(count) > len(blocks):
                raise ConfigError(
                    f"method.layers {pattern!r}: the model has only {len(blocks)} blocks",
                    f"use last:1 .. last:{len(blocks)}",
                )
            first = len(blocks) - int(count)
            hits = {n for n in names if _block_index(n, prefix) >= first}
        elif pattern in ("embeddings", "lm_head"):
            module = (
                model.get_input_embeddings()
                if pattern == "embeddings"
                else model.get_output_embeddings()
            )
            hits = {module_params[id(p)] for p in module.parameters()} if module else set()
        else:
            hits = set(fnmatch.filter(names, pattern))
        if not hits:
            raise ConfigError(
                f"method.layers {pattern!r} matches no parameter",
                "use 'last:N', 'embeddings', 'lm_head' or a glob over names such as "
                + ", ".join(names[:3] + names[-2:]),
            )
        chosen |= hits
    return chosen


def _block_index(name: str, prefix: str) -> int:
    rest = name.removeprefix(prefix + ".")
    head = rest.split(".", 1)[0]
    return int(head) if rest != name and head.isdigit() else -1


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = trainable = 0
    for p in model.parameters():
        # Packed 4-bit weights hold two values per element.
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def wrap(
    model: PreTrainedModel,
    method: MethodSection,
    lora: LoraSection,
    *,
    gradient_checkpointing: bool,
) -> PreTrainedModel:
    """Freeze and wrap the model for the method; logs how many parameters train.

    Raises:
        ConfigError: method.layers or lora.target_modules do not fit the model (select_parameters,
            lora_targets), or DoRA targets a layer it cannot adapt (exit 64)."""
    if method.name == "full":
        model.requires_grad_(True)
    elif method.name == "layers":
        chosen = select_parameters(model, method.layers)
        for name, param in model.named_parameters():
            param.requires_grad_(name in chosen)
        if gradient_checkpointing:
            model.enable_input_require_grads()
    else:
        model = _wrap_lora(model, method, lora, gradient_checkpointing)
    trainable, total = count_parameters(model)
    log.info(
        "method %s: %s of %s parameters train (%.3f%%)",
        method.name,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return model


def _wrap_lora(
    model: PreTrainedModel, method: MethodSection, lora: LoraSection, gradient_checkpointing: bool
) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method.name == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        # Frozen embeddings give activations without grad; checkpointed blocks then get none.
        model.enable_input_require_grads()
    targets = lora_targets(model.config, lora, model)
    if lora.use_dora:
        check_dora_targets(model, targets)
    # The variants are saved in adapter_config.json, so peft alone reloads them (merge, generate).
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=targets,
        modules_to_save=lora.modules_to_save or None,
        task_type="CAUSAL_LM",
        fan_in_fan_out=model.config.model_type == "gpt2",
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        init_lora_weights=lora.init_lora_weights,
    )
    compat.skip_unusable_bitsandbytes()
    wrapped: Any = get_peft_model(model, peft_config)
    return wrapped  # a PeftModel, used wherever a PreTrainedModel is


def quantization_config(compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
