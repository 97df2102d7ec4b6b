"""What a run needs per GPU, from config.json alone: shared by `estimate` and `validate`."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
from typing import Any

from llmtrain.config import PREFERENCE_METHODS, RunConfig
from llmtrain.sizing.gpus import Gpu, get_gpu
from llmtrain.sizing.memory import (
    LINEARS,
    ModelShape,
    RunShape,
    estimate,
    gib,
)


def model_shape(cfg: RunConfig) -> ModelShape:
    from llmtrain.model.load import load_model_config  # transformers: only when a config is read

    return ModelShape.from_config(load_model_config(cfg.model).to_dict())


def _attention(cfg: RunConfig) -> str:
    choice = cfg.model.attn_implementation
    if choice != "auto":
        return choice
    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def _layers(patterns: list[str], shape: ModelShape) -> dict[str, Any]:
    """method.layers as methods.select_parameters reads it, for a Llama-style naming."""
    blocks: set[int] = set()
    for p in patterns:
        if p.startswith("last:") and p[5:].isdigit():
            blocks |= set(range(shape.layers - int(p[5:]), shape.layers))
        for k in range(shape.layers):
            if fnmatch.fnmatch(f"model.layers.{k}.self_attn.q_proj.weight", p):
                blocks.add(k)
    return {
        "trainable_blocks": tuple(sorted(blocks)),
        "train_embeddings": "embeddings" in patterns
        or any(re.search("embed_tokens", p) for p in patterns),
        "train_lm_head": "lm_head" in patterns or any(p.startswith("lm_head") for p in patterns),
    }


def weight_bytes(cfg: RunConfig, method: str) -> int:
    """finetune.weights_dtype: trained weights fp32 under autocast, frozen ones 16-bit."""
    if cfg.model.dtype != "auto":
        return 4 if cfg.model.dtype == "float32" else 2
    fp32 = cfg.training.precision == "fp32"
    return 4 if fp32 or method in ("full", "layers") else 2


def run_shape(
    cfg: RunConfig,
    shape: ModelShape,
    *,
    nodes: int = 1,
    gpus_per_node: int = 1,
    attention: str | None = None,
) -> RunShape:
    """The run as finetune will set it up on a bf16-capable GPU (see finetune.weights_dtype)."""
    name, t = cfg.method.name, cfg.training
    # dpo and orpo: the trained weights' method; each micro-batch holds the chosen and the
    # rejected sample of every pair.
    pairs = name in PREFERENCE_METHODS
    method = cfg.preference.weights if name == "dpo" or name == "orpo" else name
    fp32 = t.precision == "fp32"
    targets = LINEARS if cfg.lora.target_modules == "auto" else tuple(cfg.lora.target_modules)
    strategy = cfg.distributed.strategy
    extra = _layers(cfg.method.layers, shape) if method == "layers" else {}
    return RunShape(
        method=method,
        strategy="ddp" if strategy == "auto" else strategy,
        micro_batch=t.per_device_train_batch_size * (2 if pairs else 1),
        seq_len=cfg.data.max_length,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_accumulation=t.gradient_accumulation_steps,
        dtype_bytes=4 if fp32 else 2,
        weight_bytes=weight_bytes(cfg, method),
        mixed_precision=not fp32,
        fused_adam=t.optim in ("auto", "adamw_torch_fused"),
        lora_r=cfg.lora.r,
        lora_targets=targets,
        lora_dropout=cfg.lora.dropout,
        fused_lora=t.fused_lora,
        use_dora=cfg.lora.use_dora,
        attention=attention or _attention(cfg),  # type: ignore[arg-type]
        padded=cfg.data.packing == "none",
        reference_copy=cfg.method.name == "dpo" and cfg.preference.weights == "full",
        **extra,
    )


def summary(cfg: RunConfig, gpu: str = "h100", nodes: int = 1, gpus_per_node: int = 1) -> list[str]:
    """The short form `validate` prints."""
    shape = model_shape(cfg)
    run = run_shape(cfg, shape, nodes=nodes, gpus_per_node=gpus_per_node)
    b = estimate(shape, run)
    device = get_gpu(gpu)
    verdict = "fits" if b.total <= device.memory_bytes else "DOES NOT FIT"
    return [
        f"memory per GPU ({run.method}, {run.strategy}, micro-batch {run.micro_batch} x "
        f"{run.seq_len} tokens): {gib(b.total)} GiB, {verdict} on {device.name} "
        f"({device.memory_gib:.0f} GiB)",
        f"  weights {gib(b.weights)}, grads {gib(b.gradients)}, optimizer {gib(b.optimizer)}, "
        f"activations {gib(b.activations + b.recompute)}, logits {gib(b.logits)} GiB",
    ]


def fits(cfg: RunConfig, gpu: Gpu | str, nodes: int = 1, gpus_per_node: int = 1) -> bool:
    device = get_gpu(gpu) if isinstance(gpu, str) else gpu
    shape = model_shape(cfg)
    run = run_shape(cfg, shape, nodes=nodes, gpus_per_node=gpus_per_node)
    return estimate(shape, run).total <= device.memory_bytes
