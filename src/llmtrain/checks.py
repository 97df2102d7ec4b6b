"""Checks that run before any GPU is allocated: config, paths, data rows, templates, vocab,
hardware. `validate` runs them on a login node; `finetune` runs them again at start."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from llmtrain import strategies
from llmtrain.config import RunConfig
from llmtrain.data import check_templates, load_rows, tokenize
from llmtrain.errors import ConfigError, NeedsGpuError
from llmtrain.models import load_model_config, load_tokenizer, model_class, pick_attention

log = logging.getLogger(__name__)
SAMPLE_ROWS = 2000


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_hardware(cfg: RunConfig, *, assume_gpu: bool = False) -> None:
    gpu = assume_gpu or torch.cuda.is_available()
    if cfg.method.name == "qlora" and not gpu:
        raise NeedsGpuError(
            "method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels) and this machine has none",
            "run on a GPU node, use method lora on CPU, or validate with --assume-gpu",
        )
    if cfg.training.precision in ("bf16", "fp16") and not gpu:
        raise NeedsGpuError(
            f"training.precision={cfg.training.precision} needs a CUDA GPU",
            "use training.precision=auto (fp32 on CPU) or run on a GPU node",
        )
    strategies.check(cfg)
    if cfg.distributed.strategy in ("zero2", "zero3", "zero3_offload", "fsdp") and not gpu:
        log.warning(
            "distributed.strategy=%s is meant for GPUs; on CPU it runs only where "
            "DeepSpeed/FSDP support gloo",
            cfg.distributed.strategy,
        )


def check_model(cfg: RunConfig) -> tuple[Any, Any, list[str]]:
    config = load_model_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    lines = [f"model: {config.model_type}, {getattr(config, 'num_hidden_layers', '?')} layers"]
    if model_class(config) is None:
        raise ConfigError(
            f"model type {config.model_type!r} has no causal-LM class in transformers 4.37.2",
            "use a decoder-only model, or model.trust_remote_code=true for custom code",
        )
    if cfg.method.name == "lora" and cfg.lora.use_dora:
        _check_dora(cfg, config)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}",
            "use the model's own tokenizer, or resize the model (llmtrain vocab init)",
        )
    lines.append(f"attention: {pick_attention(cfg.model, config)}")
    return config, tokenizer, lines


def _check_dora(cfg: RunConfig, config: Any) -> None:
    """The layers DoRA would adapt, found on a weightless (meta) copy of the model."""
    from accelerate import init_empty_weights

    from llmtrain.methods import check_dora_targets, lora_targets

    cls = model_class(config)
    assert cls is not None  # check_model refused the model otherwise
    with init_empty_weights():
        skeleton = cls(config)
    check_dora_targets(skeleton, lora_targets(config, cfg.lora, skeleton))


def run_checks(cfg: RunConfig, *, assume_gpu: bool = False) -> Report:
    report = Report()
    check_hardware(cfg, assume_gpu=assume_gpu)
    _, tokenizer, lines = check_model(cfg)
    report.lines += lines
    rows = load_rows(cfg.data)
    check_templates(cfg.data, rows)
    sample = rows.select(range(min(SAMPLE_ROWS, len(rows))))
    _, stats = tokenize(sample, tokenizer, cfg.data)
    scope = "all" if len(sample) == len(rows) else f"first {len(sample)} of {len(rows)}"
    report.lines.append(f"data ({scope} rows): {stats.summary()}")
    if stats.truncated or stats.dropped_too_long or stats.dropped_prompt_too_long:
        report.warnings.append(
            f"{stats.truncated + stats.dropped_too_long + stats.dropped_prompt_too_long} of "
            f"{stats.rows} sampled rows exceed data.max_length={cfg.data.max_length} "
            f"(policy: {cfg.data.overflow})"
        )
    return report
