"""One training run: build (tokenizer, prepared data, model, method, speed levers) -> train ->
save the final result. The `finetune` verb calls `train`; bench/ and the GPU tests call it too."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from llmtrain import manifest
from llmtrain.config import RunConfig, dump_config
from llmtrain.data import chat, prepared
from llmtrain.data.collate import PadCollator
from llmtrain.errors import StopRequested
from llmtrain.kernels import lora as fused_lora
from llmtrain.kernels import loss as fused_loss
from llmtrain.kernels import ops as fused_ops
from llmtrain.kernels import varlen_attention
from llmtrain.model.load import DTYPES, load_model, load_tokenizer
from llmtrain.model.methods import count_parameters, quantization_config, wrap
from llmtrain.train import checkpoints, hf_names, loss_weighting, strategies
from llmtrain.train.callbacks import (
    METRICS,
    CommitCheckpointCallback,
    MetricsCallback,
    RunReport,
    StopCallback,
    deadline_from_env,
    truncate_metrics,
)
from llmtrain.train.post_run import post_run
from llmtrain.train.strategies import World
from llmtrain.train.trainer import LlmtrainTrainer, LossRecorder, StepBoundary
from llmtrain.vocab import special_tokens

log = logging.getLogger(__name__)


def precision_flags(cfg: RunConfig) -> dict[str, bool]:
    precision = cfg.training.precision
    if precision == "auto":
        gpu = torch.cuda.is_available()
        precision = (
            "bf16" if gpu and torch.cuda.is_bf16_supported() else ("fp16" if gpu else "fp32")
        )
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def weights_dtype(cfg: RunConfig, flags: dict[str, bool]) -> torch.dtype:
    """Frozen weights in 16 bits; trained full weights in fp32 under 16-bit autocast."""
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    half = torch.bfloat16 if flags["bf16"] else torch.float16 if flags["fp16"] else None
    if half is not None and cfg.method.name in ("lora", "qlora"):
        return half
    return torch.float32


def training_arguments(
    cfg: RunConfig, world: World, output_dir: Path, has_eval: bool, block_class: str | None
) -> TrainingArguments:
    t = cfg.training
    flags = precision_flags(cfg)
    optim = t.optim
    if optim == "auto":
        optim = "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"
    # Held-out data is evaluated by default, at every checkpoint (so the best one is known).
    eval_on = has_eval
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_ratio=t.warmup_ratio,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        optim=optim,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}
        if t.gradient_checkpointing
        else None,
        logging_steps=t.logging_steps,
        logging_dir=str(output_dir / "tensorboard"),
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # retention is ours, by step number (see checkpoints.py)
        evaluation_strategy="steps" if eval_on else "no",
        eval_steps=(t.eval_steps or t.save_steps) if eval_on else None,
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=t.dataloader_num_workers,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        remove_unused_columns=False,
        disable_tqdm=not sys.stderr.isatty(),
        **flags,
        **strategies.training_kwargs(cfg, world, block_class),
        **t.args,
    )
    args = TrainingArguments(**hf_names.training_arguments(kwargs))
    if not world.distributed and args.n_gpu > 1:
        # HF would wrap the model in torch.nn.DataParallel: measured 7x slower than one GPU.
        log.warning(
            "%d GPUs are visible but no launcher started one process per GPU: training on one "
            "GPU. Use all of them with `torchrun --nproc-per-node %d -m llmtrain finetune ...` "
            "or the slurm/ and pbs/ job scripts.",
            args.n_gpu,
            args.n_gpu,
        )
        args._n_gpu = 1
    return args


def _block_class(model: Any) -> str | None:
    classes = getattr(model, "_no_split_modules", None) or []
    # A list in 4.37.2, a set in 5.x: the first by name, so every rank picks the same one.
    if not classes:
        return None
    return classes[0] if isinstance(classes, list) else sorted(classes)[0]


def _upcast_trainable(model: Any) -> None:
    """Train adapter weights in fp32 (stable Adam updates); autocast keeps matmuls 16-bit."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def apply_speed_levers(cfg: RunConfig, world: World, model: Any) -> bool:
    """Padding-free attention, compiled block pieces, chunked loss; before the model is wrapped.
    True if the chunked loss is patched in."""
    compiled = cfg.training.compile
    if cfg.data.packing == "padding_free" or (compiled and varlen_attention.supports(model)):
        varlen_attention.patch_attention(model, compiled_rope=compiled)
    if compiled:
        fused_ops.compile_blocks(model)
    if cfg.training.chunked_loss:
        strategy = strategies.resolve(cfg, world)
        if strategy in ("fsdp", "zero3", "zero3_offload"):
            log.info("chunked loss: off under %s, whose lm_head weight is sharded", strategy)
        else:
            return fused_loss.patch_causal_lm_loss(model, compiled=compiled)
    return False


def train(cfg: RunConfig, world: World, extra_callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    """Train, save the final result; returns the Trainer (its model is the trained one)."""
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.model)
    if cfg.data.shape == "chat":
        # Saved with the tokenizer in every output, so generate and the merged model chat the
        # way training rendered the data.
        tokenizer.chat_template = chat.resolve_template(tokenizer, cfg.data)
    timeout_s = cfg.distributed.timeout_minutes * 60
    splits, data_fp = prepared.ensure(cfg, tokenizer, is_main=world.is_main, timeout_s=timeout_s)
    facts = {
        "world_size": world.world_size,
        "per_device_train_batch_size": cfg.training.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.training.gradient_accumulation_steps,
        "seed": cfg.training.seed,
        "data_fingerprint": data_fp,
    }
    resume = checkpoints.resume_point(out, cfg.output.resume)
    if resume is not None:
        checkpoints.check_topology(resume, facts, cfg.distributed.allow_topology_change)
        checkpoints.trust_own_checkpoints()
        log.info("resuming from %s", resume)
    if world.is_main:
        checkpoints.discard_incomplete_after(out, resume)
        truncate_metrics(out, checkpoints.read_marker(resume)["step"] if resume else 0)
        (out / "config.yaml").write_text(dump_config(cfg))
        manifest.write(
            out / "manifest.json",
            manifest.build(
                **facts,
                strategy=strategies.resolve(cfg, world),
                resumed_from=str(resume) if resume else None,
            ),
        )

    # Before the model is built: LoRA's initial weights come from this seed.
    set_seed(cfg.training.seed)
    flags = precision_flags(cfg)
    dtype = weights_dtype(cfg, flags)
    extra: dict[str, Any] = {}
    if cfg.method.name == "qlora":
        extra["quantization_config"] = quantization_config(
            torch.bfloat16 if flags["bf16"] else torch.float16
        )
        extra["device_map"] = {"": world.local_rank}
    model = load_model(cfg.model, dtype=dtype, extra=extra)
    block_class = _block_class(model)
    chunked_loss = apply_speed_levers(cfg, world, model)
    model = wrap(
        model, cfg.method, cfg.lora, gradient_checkpointing=cfg.training.gradient_checkpointing
    )
    if cfg.method.name in ("lora", "qlora"):
        _upcast_trainable(model)
    if (
        cfg.method.name == "lora"
        and cfg.training.fused_lora
        and strategies.resolve(cfg, world) in fused_lora.STRATEGIES
    ):
        fused_lora.patch(model)

    args = training_arguments(cfg, world, out, "eval" in splits, block_class)
    stop = StopCallback(
        stop_file=Path(p) if (p := os.environ.get("LLMTRAIN_STOP_FILE")) else None,
        deadline=deadline_from_env(),
        margin_s=float(os.environ.get("LLMTRAIN_DEADLINE_MARGIN", "300")),
        every=int(os.environ.get("LLMTRAIN_STOP_CHECK_STEPS", "1")),
    )
    stop.install_signal_handlers()
    recorder = LossRecorder()
    batch_log = not sys.stderr.isatty()  # Slurm and PBS logs: no progress bar, lines instead
    report = RunReport(
        out, prepared.train_stats(cfg.prepared_dir()), count_parameters(model),
        progress_lines=batch_log,
    )
    trainer = LlmtrainTrainer(
        model=model,
        args=args,
        train_dataset=loss_weighting.StepTokenDataset(splits["train"]),
        eval_dataset=splits.get("eval"),
        data_collator=loss_weighting.StepTokenCollator(
            varlen_attention.PackingCollator()
            if cfg.data.packing == "padding_free"
            else PadCollator(tokenizer.pad_token_id)
        ),
        callbacks=[
            StepBoundary(recorder),
            MetricsCallback(out, recorder.drain),
            stop,
            CommitCheckpointCallback(
                out, cfg.output.keep_checkpoints, facts, keep_best=cfg.output.keep_best
            ),
            report,
            *extra_callbacks,
        ],
        recorder=recorder,
        chunked_loss=chunked_loss,
    )
    if batch_log:
        trainer.remove_callback(PrinterCallback)  # its raw log dicts; RunReport's lines instead
    strategies.prepare_trainer(trainer, cfg)
    with strategies.peft_deepspeed_resume(trainer):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.reason is not None:
        raise StopRequested(f"{stop.reason}; checkpoint at step {trainer.state.global_step}")
    final = save_final(cfg, world, trainer, tokenizer, out)
    if world.is_main:
        log.info("%s", report.summary(cfg.method.name, {
            "run directory": out,
            f"final {final.name}": final,
            "merged model": out / "final" / "merged",
            "generations": out / "generations.jsonl",
            "metrics": out / METRICS,
            "tensorboard": out / "tensorboard",
        }))
    return trainer


def save_final(cfg: RunConfig, world: World, trainer: Trainer, tokenizer: Any, out: Path) -> Path:
    is_adapter = cfg.method.name in ("lora", "qlora")
    final = out / "final" / ("adapter" if is_adapter else "model")
    tmp = final.with_name(f".{final.name}.tmp")
    strategies.save_model(trainer, str(tmp))  # every rank: FSDP and ZeRO-3 gather here
    if world.is_main:
        tokenizer.save_pretrained(str(tmp))
        special_tokens.write_generation_config(
            tmp,
            getattr(trainer.model, "generation_config", None),
            tokenizer,
            also_stop=chat.stop_ids(tokenizer) if cfg.data.shape == "chat" else (),
        )
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        log.info("final %s saved to %s", "adapter" if is_adapter else "model", final)
    trainer.accelerator.wait_for_everyone()
    if world.is_main:
        post_run(cfg, final, out)
    return final


def close_process_group() -> None:
    """A gloo or NCCL thread still alive at interpreter exit aborts the process ("terminate
    called without an active exception"): a finished or stopped run became exit 134 (seen in
    CI on the stop path of FSDP over gloo). Free what still references the process group, so
    its threads are joined now, then destroy it."""
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
