"""What a run needs per GPU, from config.json alone: shared by `estimate` and `validate`."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from llmtrain import compat, stack
from llmtrain.config import PREFERENCE_METHODS, RunConfig
from llmtrain.plan import RunPlan, World, trained_method, weight_dtype
from llmtrain.sizing.gpus import DEFAULT_GPU, Gpu, get_gpu
from llmtrain.sizing.memory import (
    LINEARS,
    ModelShape,
    RunShape,
    estimate,
    gib,
)

if TYPE_CHECKING:  # tokens reads prepared data (numpy, datasets): imported when used
    from llmtrain.sizing import tokens

# Model types whose attention modules kernels/varlen_attention.py patches (its SUPPORTED), and
# those whose loss kernels/loss.py chunks (its SUPPORTED); tests hold them equal. Named here so
# that sizing needs no torch.
LLMTRAIN_ATTENTION_MODELS = ("llama", "mistral")
CHUNKED_LOSS_MODELS = ("llama", "mistral", "qwen2", "gemma")
LIGER_MIN_TORCH = (2, 8)  # kernels/loss.py's: its Liger loss from this torch on


def model_shape(cfg: RunConfig) -> ModelShape:
    from llmtrain.model.load import load_model_config  # transformers: only when a config is read

    return ModelShape.from_config(load_model_config(cfg.model).to_dict())


def target_plan(
    cfg: RunConfig,
    *,
    nodes: int = 1,
    gpus_per_node: int = 1,
    attention_support: Mapping[str, bool] | None = None,
    gpu: Gpu | None = None,
) -> RunPlan:
    """The RunPlan finetune would make on `nodes` x `gpus_per_node` of `gpu` (None: GPUs of
    Ampere or later), flash_attn as it imports here; `attention_support` None: a Llama-style
    decoder.

    Raises:
        ConfigError: see RunPlan.build (exit 64).
    """
    world = World(rank=0, local_rank=0, world_size=nodes * gpus_per_node)
    hw = (gpu or get_gpu(DEFAULT_GPU)).node()
    return RunPlan.build(cfg, world, hw, attention_support=attention_support)


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


def weight_bytes(cfg: RunConfig, plan: RunPlan, method: str) -> int:
    """Bytes per stored weight if `plan`'s run trained with `method` (plan.weight_dtype)."""
    return _bytes(weight_dtype(cfg.model.dtype, plan.precision, method)[0])


def _bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def run_shape(
    cfg: RunConfig,
    shape: ModelShape,
    *,
    nodes: int = 1,
    gpus_per_node: int = 1,
    attention: str | None = None,
    plan: RunPlan | None = None,
    measured: tokens.Measured | None = None,
    gpu: Gpu | None = None,
) -> RunShape:
    """The run as finetune will set it up on `gpu` (None: GPUs of Ampere or later): `plan`
    (default: target_plan) decides strategy, dtypes, autocast, attention (`attention`
    overrides it: a what-if) and the optimizer. `measured`: the data's sample lengths; without
    them every sample is data.max_length long (and a token budget full)."""
    plan = plan or target_plan(cfg, nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu)
    name, t = cfg.method.name, cfg.training
    # dpo and orpo: the trained weights' method; each micro-batch holds the chosen and the
    # rejected sample of every pair.
    pairs = name in PREFERENCE_METHODS
    method = trained_method(cfg)
    fp32 = plan.precision == "fp32"
    targets = LINEARS if cfg.lora.target_modules == "auto" else tuple(cfg.lora.target_modules)
    extra: dict[str, Any] = _layers(cfg.method.layers, shape) if method == "layers" else {}
    seq_len = cfg.data.max_length
    packed = cfg.data.packing == "padding_free"
    padded = cfg.data.packing == "none"
    if measured is not None and len(measured.lengths):
        from llmtrain.sizing import tokens

        width = tokens.padded_width(measured.lengths)
        seq_len = min(seq_len, width)
        # Samples all of one length, a multiple of 8 (PadCollator's): no batch is padded, and
        # transformers drops the all-ones mask (SDPA gets none; llmtrain's attention forward runs).
        padded = padded and (pairs or width > int(measured.lengths.min()))
        if packed:
            extra["batch_tokens"] = tokens.largest_micro_batch_tokens(
                cfg, measured.lengths, nodes * gpus_per_node
            )
    elif t.tokens_per_batch is not None:
        extra["batch_tokens"] = t.tokens_per_batch
    return RunShape(
        method=method,
        # one process is a DDP world of one to the estimator
        strategy="ddp" if plan.strategy == "single" else plan.strategy,
        micro_batch=t.per_device_train_batch_size * (2 if pairs else 1),
        seq_len=seq_len,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_accumulation=t.gradient_accumulation_steps,
        dtype_bytes=4 if fp32 else 2,
        weight_bytes=_bytes(plan.weight_dtype),
        mixed_precision=not fp32,
        fused_adam=plan.optim == "adamw_torch_fused",
        lora_r=cfg.lora.r,
        lora_targets=targets,
        lora_dropout=cfg.lora.dropout,
        fused_lora=t.fused_lora,
        use_dora=cfg.lora.use_dora,
        master_weights=plan.master_weights,
        attention=attention or plan.attention,  # type: ignore[arg-type]
        padded=padded,
        reference_copy=cfg.method.name == "dpo" and cfg.preference.weights == "full",
        compiled=t.compile,
        chunked_loss=plan.chunked_loss and shape.model_type in CHUNKED_LOSS_MODELS,
        # On the GPUs estimated for, the chunked loss is Liger's where liger-kernel is installed
        # (the current stack's lock) and this torch allows it; kernels/loss.py's other
        # fallbacks, not modelled here, keep the chunks.
        liger_loss=plan.chunked_loss
        and shape.model_type in CHUNKED_LOSS_MODELS
        and compat.installed("liger-kernel") is not None
        and compat.at_least("torch", *LIGER_MIN_TORCH),
        attention_forward=_attention_forward(
            shape, attention or plan.attention, packed, padded, t.compile
        ),
        # transformers 5.x: llmtrain's attention is only the function inside transformers'
        # module (RunShape.whole_attention_forward).
        whole_attention_forward=not stack.is_current(),
        grouped_query_kernel=gpu is None or gpu.bf16,
        **extra,
    )


def _attention_forward(
    shape: ModelShape, attention: str, packed: bool, padded: bool, compiled: bool
) -> Literal["transformers", "rows", "packed"]:
    """Which attention forward train/run.apply_speed_levers leaves the model: llmtrain's for
    padding-free packing, and under training.compile for rows that carry no attention mask
    (varlen_attention.supports: not eager attention); transformers' otherwise."""
    if packed:
        return "packed"
    ours = shape.model_type in LLMTRAIN_ATTENTION_MODELS and attention != "eager"
    return "rows" if compiled and ours and not padded else "transformers"


def micro_batch_words(run: RunShape, measured: tokens.Measured | None) -> str:
    """How the estimate counted a micro-batch's tokens, for the report lines."""
    source = f"lengths of {measured.source}" if measured is not None else "data.max_length"
    if run.batch_tokens is not None:
        return f"largest packed micro-batch {run.batch_tokens} tokens, from the {source}"
    return f"micro-batch {run.micro_batch} x {run.seq_len} tokens, from the {source}"


def summary(
    cfg: RunConfig,
    gpu: Gpu | str = "h100",
    nodes: int = 1,
    gpus_per_node: int = 1,
    plan: RunPlan | None = None,
    measured: tokens.Measured | None = None,
) -> tuple[list[str], bool]:
    """The short form `validate` prints, and whether the run fits `gpu`."""
    shape = model_shape(cfg)
    device = get_gpu(gpu) if isinstance(gpu, str) else gpu
    plan = plan or target_plan(cfg, nodes=nodes, gpus_per_node=gpus_per_node, gpu=device)
    run = run_shape(
        cfg,
        shape,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        plan=plan,
        measured=measured,
        gpu=device,
    )
    b = estimate(shape, run)
    fits = b.total <= device.memory_bytes
    overhead = b.total - b.allocated  # the CUDA context, NCCL buffers, fragmentation margin
    return [
        f"memory per GPU ({run.method}, {plan.strategy}, {micro_batch_words(run, measured)}): "
        f"{gib(b.total)} GiB, {'fits' if fits else 'DOES NOT FIT'} on {device.name} "
        f"({device.memory_gib:.0f} GiB)",
        f"  weights {gib(b.weights)}, grads {gib(b.gradients)}, optimizer {gib(b.optimizer)}, "
        f"activations {gib(b.activations + b.recompute)}, logits {gib(b.logits)}, "
        f"CUDA context and margin {gib(overhead)} GiB",
    ], fits
