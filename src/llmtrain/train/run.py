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

from llmtrain import compat, manifest, stack
from llmtrain.config import RunConfig, dump_config
from llmtrain.data import chat, prepared
from llmtrain.data.collate import PadCollator
from llmtrain.data.token_budget import row_lengths
from llmtrain.errors import ConfigError, StopRequested
from llmtrain.kernels import lora as fused_lora
from llmtrain.kernels import loss as fused_loss
from llmtrain.kernels import ops as fused_ops
from llmtrain.kernels import varlen_attention
from llmtrain.model import support
from llmtrain.model.device import this_machine
from llmtrain.model.load import (
    DTYPES,
    attention_support,
    load_model,
    load_model_config,
    load_tokenizer,
)
from llmtrain.model.methods import count_parameters, quantization_config, wrap
from llmtrain.plan import RunPlan, World, check_world
from llmtrain.train import checkpoints, hf_names, loss_weighting, strategies
from llmtrain.train.callbacks import (
    METRICS,
    CommitCheckpointCallback,
    MetricsCallback,
    RunReport,
    StopCallback,
    truncate_metrics,
)
from llmtrain.train.master_weights import MasterWeights
from llmtrain.train.post_run import post_run
from llmtrain.train.token_budget import TokenBudget
from llmtrain.train.trainer import TENSORBOARD_DIR, LlmtrainTrainer, LossRecorder, StepBoundary
from llmtrain.vocab import special_tokens

log = logging.getLogger(__name__)


def plan_run(cfg: RunConfig, world: World) -> RunPlan:
    """The run's plan for this process's world and machine, checked against them; reads the
    model's config.json only (for the attention implementations it has).

    Raises:
        ConfigError: see RunPlan.build and plan.check_world (exit 64).
    """
    hw = this_machine()
    config = load_model_config(cfg.model)
    plan = RunPlan.build(
        cfg, world, hw, attention_support=attention_support(config), model_type=config.model_type
    )
    check_world(plan.strategy, world, cuda=hw.cuda)
    return plan


# accelerate's name for each of the plan's precisions
MIXED_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def _mixed_precision_from_plan(plan: RunPlan) -> None:
    """ACCELERATE_MIXED_PRECISION as the plan decides. TrainingArguments starts from that
    variable and writes it back only for bf16 or fp16 (transformers 4.37.2 training_args.py,
    __post_init__), so an fp32 run after a bf16 one in the same process, or under `accelerate
    launch` with mixed_precision bf16, trained under bf16 autocast without a word."""
    wanted = MIXED_PRECISION[plan.precision]
    given = os.environ.get("ACCELERATE_MIXED_PRECISION")
    # "no" is also what configs/accelerate/*.yaml leave to the run config: not worth a warning.
    if given not in (None, "no", wanted):
        log.warning(
            "ACCELERATE_MIXED_PRECISION=%s (e.g. accelerate launch's mixed_precision) is "
            "replaced by the plan's %s (training.precision: %s)",
            given, wanted, plan.reasons["precision"],
        )
    os.environ["ACCELERATE_MIXED_PRECISION"] = wanted


def training_arguments(
    cfg: RunConfig,
    world: World,
    plan: RunPlan,
    output_dir: Path,
    has_eval: bool,
    block_class: str | None,
    budget: TokenBudget | None = None,
) -> TrainingArguments:
    """`budget`: token-budget micro-batches, one chunk per DataLoader batch, the plan's count
    of them per step (the configured batch and accumulation then only set samples per step).

    Raises:
        ConfigError: the Trainer counts another number of processes than the launcher started
            (`world`), e.g. training.args sets use_cpu=false on a CPU machine: it would neither
            shard the data nor average the gradients as loss_weighting weights them (exit 64).
    """
    t = cfg.training
    batch, accumulation = t.per_device_train_batch_size, t.gradient_accumulation_steps
    if budget is not None:
        batch, accumulation = 1, budget.accumulation
    # Held-out data is evaluated by default, at every checkpoint (so the best one is known).
    eval_on = has_eval
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=accumulation,
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
        # With master weights the gradients are on the masters when the Trainer would clip:
        # MasterWeights clips them itself.
        max_grad_norm=0.0 if plan.master_weights else t.max_grad_norm,
        optim=plan.optim,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}
        if t.gradient_checkpointing
        else None,
        logging_steps=t.logging_steps,
        logging_dir=str(output_dir / TENSORBOARD_DIR),
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
        **plan.flags,
        **strategies.training_kwargs(cfg, plan, block_class),
        # HF's NaN filter reads every micro-batch's loss on the host (a sync that idles the
        # GPU while the host queues the optimizer step); LossRecorder keeps the exact losses,
        # and a NaN then shows in the log instead of being replaced by the running mean.
        # training.args may still turn it on. Pinned host memory serves only the copy to a GPU;
        # without one, torch warns at every DataLoader pass that it is unused.
        **{
            "logging_nan_inf_filter": False,
            "dataloader_pin_memory": torch.cuda.is_available(),
            **t.args,
        },
    )
    if stack.is_current() and not torch.cuda.is_available():
        # accelerate 1.x counts a CPU process that torchrun started as one of WORLD_SIZE (gloo)
        # only when told it runs on CPU; 0.26 did so from WORLD_SIZE alone. Untold, each rank
        # trains alone: all the data on every rank, no DDP, its own update.
        kwargs.setdefault("use_cpu", True)
    if kwargs.get("use_cpu") and world.distributed:
        # Either stack starts a use_cpu world's group without ddp_timeout (start_cpu_group).
        strategies.start_cpu_group(kwargs["ddp_timeout"])
    _mixed_precision_from_plan(plan)
    args = TrainingArguments(**hf_names.training_arguments(kwargs))
    if args.world_size != world.world_size:
        raise ConfigError(
            f"the Trainer counts {args.world_size} process(es) but the launcher started "
            f"{world.world_size} ({stack.describe()}): the ranks would train apart",
            "leave use_cpu out of training.args",
        )
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


def apply_speed_levers(cfg: RunConfig, plan: RunPlan, model: Any) -> bool:
    """Padding-free attention, compiled block pieces, chunked loss; before the model is wrapped.
    True if the chunked loss is patched in (the plan asks for it and the model allows it)."""
    compiled = cfg.training.compile
    if cfg.data.packing == "padding_free" or (compiled and varlen_attention.supports(model)):
        varlen_attention.patch_attention(
            model, compiled_rope=compiled, packed=cfg.data.packing == "padding_free"
        )
    if compiled:
        fused_ops.compile_blocks(model)
    if not plan.chunked_loss:
        log.info("chunked loss: off (%s)", plan.reasons["chunked_loss"])
        return False
    return fused_loss.patch_causal_lm_loss(model, compiled=compiled)


def training_collator(cfg: RunConfig, pad_token_id: int) -> loss_weighting.StepTokenCollator:
    """The Trainer's collator for training and evaluation batches: packed rows for
    data.packing=padding_free, else padded rows without the mask of a batch nothing in is padded
    (PadCollator.omit_full_mask: no host sync over an all-ones mask; apply_speed_levers tells
    the attention that such rows are whole samples)."""
    return loss_weighting.StepTokenCollator(
        varlen_attention.PackingCollator()
        if cfg.data.packing == "padding_free"
        else PadCollator(pad_token_id, omit_full_mask=True)
    )


def train(cfg: RunConfig, world: World, extra_callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    """Train, save the final result; returns the Trainer (its model is the trained one).

    Raises:
        ConfigError: the plan cannot run in this world on this machine (exit 64), before
            anything is written.
        DataError: a data file cannot be read or holds a bad row (exit 65), before training.
        StopRequested: a stop signal or the wall-time guard ended training early, after the
            checkpoint it names was saved (exit 75: requeue and resume).
    """
    plan = plan_run(cfg, world)
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
        "param_dtype": cfg.training.param_dtype,
    }
    resume = checkpoints.resume_point(out, cfg.output.resume)
    if resume is not None:
        checkpoints.check_topology(resume, facts, cfg.distributed.allow_topology_change)
        compat.trust_own_checkpoints()
        log.info("resuming from %s", resume)
    if world.is_main:
        checkpoints.discard_incomplete_after(out, resume)
        truncate_metrics(out, checkpoints.read_marker(resume)["step"] if resume else 0)
        (out / "config.yaml").write_text(dump_config(cfg))
        manifest.write(
            out / "manifest.json",
            manifest.build(
                **facts,
                strategy=plan.strategy,
                plan=plan.to_dict(),
                resumed_from=str(resume) if resume else None,
            ),
        )

    # Before the model is built: LoRA's initial weights come from this seed.
    set_seed(cfg.training.seed)
    log.info("plan:\n%s", "\n".join(plan.lines()))
    extra: dict[str, Any] = {}
    if plan.quantized:
        extra["quantization_config"] = quantization_config(DTYPES[plan.compute_dtype])
        extra["device_map"] = {"": world.local_rank}
    model = load_model(
        cfg.model,
        dtype=DTYPES[plan.weight_dtype],
        attn_implementation=plan.attention,
        extra=extra,
    )
    block_class = _block_class(model)
    chunked_loss = apply_speed_levers(cfg, plan, model)
    model = wrap(
        model, cfg.method, cfg.lora, gradient_checkpointing=cfg.training.gradient_checkpointing
    )
    if plan.adapter:
        _upcast_trainable(model)
    if plan.fused_lora:
        fused_lora.patch(model)

    train_split = loss_weighting.StepTokenDataset(splits["train"])
    budget = None
    if cfg.training.tokens_per_batch is not None:
        lengths = row_lengths(splits["train"])
        budget = TokenBudget.for_run(cfg, world.world_size, lengths, train_split.counts)
    args = training_arguments(cfg, world, plan, out, "eval" in splits, block_class, budget)
    stop = StopCallback(
        stop_file=Path(world.stop_file) if world.stop_file else None,
        deadline=world.deadline,
        margin_s=world.deadline_margin_s,
        every=world.stop_check_steps,
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
        train_dataset=train_split,
        eval_dataset=splits.get("eval"),
        data_collator=training_collator(cfg, tokenizer.pad_token_id),
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
        token_budget=budget,
        master_weights=(
            MasterWeights(cfg.training.max_grad_norm)
            if plan.master_weights else None
        ),
    )
    if batch_log:
        trainer.remove_callback(PrinterCallback)  # its raw log dicts; RunReport's lines instead
    strategies.prepare_trainer(trainer, cfg)
    with compat.peft_deepspeed_resume(trainer):
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.reason is not None:
        raise StopRequested(f"{stop.reason}; checkpoint at step {trainer.state.global_step}")
    final = save_final(cfg, plan, world, trainer, tokenizer, out)
    if world.is_main:
        log.info("%s", report.summary(cfg.method.name, summary_outputs(out, final)))
    return trainer


def summary_outputs(out: Path, final: Path) -> dict[str, Path]:
    """The run summary's outputs, in order (RunReport.summary leaves out those that do not
    exist). The final weights are the last step's; the checkpoint with the lowest eval loss is
    named beside them, so that nobody takes one for the other."""
    best = out / checkpoints.BEST
    return {
        "run directory": out,
        f"final {final.name} (the last step's)": final,
        "merged model": out / "final" / "merged",
        "best checkpoint (lowest eval loss)": (
            out / best.read_text().strip() if best.is_file() else best
        ),
        "generations": out / "generations.jsonl",
        "metrics": out / METRICS,
        "tensorboard": out / TENSORBOARD_DIR,
    }


def save_final(
    cfg: RunConfig, plan: RunPlan, world: World, trainer: Trainer, tokenizer: Any, out: Path
) -> Path:
    is_adapter = plan.adapter
    final = out / "final" / ("adapter" if is_adapter else "model")
    tmp = final.with_name(f".{final.name}.tmp")
    strategies.save_model(trainer, str(tmp))  # every rank: FSDP and ZeRO-3 gather here
    if world.is_main:
        tokenizer.save_pretrained(str(tmp))
        support.write_portable_tokenizer(tmp)  # readable by the pinned stack's tokenizers too
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
        post_run(cfg, plan, final, out)
    return final


def close_process_group() -> None:
    """A gloo or NCCL thread still alive at interpreter exit aborts the process ("terminate
    called without an active exception"): a finished or stopped run became exit 134 (seen in
    CI on the stop path of FSDP over gloo). Free what still references the process group, so
    its threads are joined now, then destroy it."""
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
