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

# The attention and MLP linear layers per architecture, as transformers names the modules (4.37.2
# and 5.x alike where the family exists in both). `auto` adapts the ones a loaded model has, so
# one entry serves both stacks where a release renamed or fused layers (lora_targets).
_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_GATED_MLP = ["gate_proj", "up_proj", "down_proj"]
LORA_TARGETS: dict[str, list[str]] = {
    "llama": _ATTN + _GATED_MLP,  # Llama 1-3.3 (rope_scaling llama3 changes no module)
    "mistral": _ATTN + _GATED_MLP,  # also Mistral-NeMo (head_dim 128 changes only the shapes)
    # Mixture of experts. transformers 4.37.2 keeps each expert as nn.Linear modules w1, w2, w3;
    # 5.x fuses a layer's experts into 3-D parameters (MixtralExperts.gate_up_proj, .down_proj)
    # that LoRA cannot adapt as a Linear, so there auto adapts the attention only (the router,
    # `gate`, is never a target).
    "mixtral": [*_ATTN, "w1", "w2", "w3"],
    "qwen2": _ATTN + _GATED_MLP,  # Qwen2 and Qwen2.5 (q, k, v with bias)
    "qwen3": _ATTN + _GATED_MLP,  # Qwen3 (q_norm and k_norm are not linears)
    # Qwen1.5-MoE / Qwen2-MoE and Qwen3-MoE: the routed experts are fused 3-D parameters in 5.x
    # (as Mixtral's), so auto adapts the attention and the dense linears that remain: the shared
    # expert's gate/up/down_proj (qwen2_moe) and the MLPs of mlp_only_layers (both).
    "qwen2_moe": _ATTN + _GATED_MLP,
    "qwen3_moe": _ATTN + _GATED_MLP,
    "gemma": _ATTN + _GATED_MLP,
    "gemma2": _ATTN + _GATED_MLP,
    "gemma3_text": _ATTN + _GATED_MLP,  # Gemma-3 1B and the text tower of Gemma3ForCausalLM
    # Phi-3, Phi-3.5 and Phi-4 (model type phi3): q, k, v fused in qkv_proj, gate and up in
    # gate_up_proj.
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
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
    present = set(linear_module_names(model))
    if lora.target_modules != "auto":
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
            "set lora.target_modules to a list of its linear layers: " + ", ".join(sorted(present)),
        )
    targets = [t for t in LORA_TARGETS[config.model_type] if t in present]
    if not targets:
        raise ConfigError(
            f"lora.target_modules=auto: this {config.model_type} model has none of the linear "
            f"layers {LORA_TARGETS[config.model_type]}",
            "set lora.target_modules to a list of its linear layers: " + ", ".join(sorted(present)),
        )
    absent = [t for t in LORA_TARGETS[config.model_type] if t not in present]
    if absent:
        log.info(
            "lora.target_modules=auto: %s has no linear layers %s (fused or absent in this "
            "release); adapting %s",
            config.model_type,
            absent,
            targets,
        )
    experts = expert_parameter_names(model)
    if experts and not lora.target_parameters:
        log.info(
            "lora.target_modules=auto: the fused expert weights %s are not adapted; "
            "lora.target_parameters=[%s] with lora.dropout=0 adapts them",
            experts,
            ",".join(experts),
        )
    return targets


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Distinct `module.parameter` suffixes of the 3-D parameters (a mixture of experts' fused
    expert weights, [experts, out, in] or [experts, in, out]), as lora.target_parameters names
    them, e.g. mlp.experts.gate_up_proj."""
    names = {
        ".".join(name.split(".")[-3:]) for name, p in model.named_parameters() if p.dim() == 3
    }
    return sorted(names)


def lora_target_parameters(lora: LoraSection, model: nn.Module, modules: list[str]) -> list[str]:
    """lora.target_parameters, each matched against the model's parameters as peft matches them
    (the whole name, or its end after a dot); `modules` are the resolved lora.target_modules.

    Raises:
        ConfigError (exit 64), where peft would fail inside finetune instead:
            an entry names no parameter of the model;
            it matches a parameter that is not 2-D or 3-D (peft's ParamWrapper takes those only);
            it matches a weight of a layer that lora.target_modules adapts already;
            it matches a parameter of a module in lora.modules_to_save (peft cannot copy a
            ParamWrapper)."""
    params = dict(model.named_parameters())
    experts = expert_parameter_names(model)
    hint = (
        "name its fused expert weights, e.g. " + ", ".join(experts)
        if experts
        else "this model has no fused 3-D expert weights; adapt its Linear layers with "
        "lora.target_modules"
    )
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    # peft's match: the whole name, or its end after a dot
    matches = {
        t: [n for n in params if n == t or n.endswith("." + t)] for t in lora.target_parameters
    }
    missing = [t for t, names in matches.items() if not names]
    if missing:
        raise ConfigError(
            f"lora.target_parameters {missing} name no parameter of this {model_type} model", hint
        )
    for t, names in matches.items():
        for name in names:
            owner = name.rpartition(".")[0]
            if params[name].dim() not in (2, 3):
                raise ConfigError(
                    f"lora.target_parameters {t!r} matches {name}, a {params[name].dim()}-D "
                    "parameter: peft adapts 2-D and 3-D parameters only",
                    hint,
                )
            if owner.rpartition(".")[2] in modules:
                raise ConfigError(
                    f"lora.target_parameters {t!r} matches {name}, a weight of a layer that "
                    f"lora.target_modules adapts already ({owner.rpartition('.')[2]})",
                    f"remove {t!r} from lora.target_parameters, or its layer from "
                    "lora.target_modules",
                )
            saved = [m for m in lora.modules_to_save if owner.endswith(m)]  # peft's match
            if saved:
                raise ConfigError(
                    f"lora.target_parameters {t!r} matches {name}, inside lora.modules_to_save "
                    f"{saved}: peft cannot both adapt and fully train one module",
                    "adapt it (lora.target_parameters) or train it whole "
                    "(lora.modules_to_save), not both",
                )
    return list(lora.target_parameters)


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
    # Only set when given: peft 0.9.0's LoraConfig has no such field (plan.check refuses it there).
    parameters: dict[str, Any] = (
        {"target_parameters": lora_target_parameters(lora, model, targets)}
        if lora.target_parameters
        else {}
    )
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
        **parameters,
    )
    compat.skip_unusable_bitsandbytes()
    wrapped: Any = get_peft_model(model, peft_config)
    _save_embeddings_only_if_resized(wrapped, _vocab_of(model.config))
    return wrapped  # a PeftModel, used wherever a PreTrainedModel is


def _save_embeddings_only_if_resized(wrapped: Any, vocab_size: int | None) -> None:
    """Every adapter save (the Trainer's checkpoints, the final adapter) decides here whether
    the embedding layers go into it: only when the vocabulary changed after wrapping.

    peft's default (`save_embedding_layers="auto"`) asks the Hugging Face Hub for the base
    model's config.json at each save. peft 0.9.0 asks even for a local directory, which is no
    Hub id, and for any id in offline mode (launch.sh sets HF_HUB_OFFLINE): each save then warned
    "Could not find a config file ... will assume that the vocabulary was not modified", or
    waited on the network of a compute node. llmtrain changes a vocabulary only before
    training (llmtrain vocab), so the base model's own vocab_size (`vocab_size`, tokens; None
    where the config has none) is the answer, known without asking. An explicit
    save_embedding_layers from a caller is kept. An object holding the model rather than a
    closure or bound method, so that a deep copy saves itself and the model still pickles."""
    wrapped.save_pretrained = _AdapterSave(wrapped, vocab_size)


def _vocab_of(config: Any) -> int | None:
    """The vocabulary size of a (possibly composite) config: transformers 5.x's multimodal
    configs (gemma3, llava, ...) keep it in their text config only; None where there is none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


class _AdapterSave:
    """A PeftModel's save_pretrained, save_embedding_layers decided from the vocabulary."""

    def __init__(self, model: Any, wrapped_vocab: int | None) -> None:
        self.model = model
        self.wrapped_vocab = wrapped_vocab

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "save_embedding_layers" not in kwargs:
            vocab = _vocab_of(self.model.get_base_model().config)
            kwargs["save_embedding_layers"] = vocab != self.wrapped_vocab
        return type(self.model).save_pretrained(self.model, *args, **kwargs)


def quantization_config(compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
