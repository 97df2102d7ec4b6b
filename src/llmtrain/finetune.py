"""`llmtrain finetune`: parse -> build -> train -> save. One loop for every method and strategy."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback

from llmtrain import (
    chat,
    checkpoints,
    demo_eval,
    fused_lora,
    fused_loss,
    fused_ops,
    loss_weighting,
    manifest,
    packing,
    prepared,
    prompts,
    special_tokens,
    strategies,
)
from llmtrain.callbacks import (
    METRICS,
    CommitCheckpointCallback,
    MetricsCallback,
    RunReport,
    StopCallback,
    deadline_from_env,
    truncate_metrics,
)
from llmtrain.checks import run_checks
from llmtrain.collate import PadCollator
from llmtrain.config import RunConfig, dump_config, load_config
from llmtrain.errors import StopRequested
from llmtrain.export import load_for_inference, merge
from llmtrain.generation import generate, write_jsonl
from llmtrain.methods import count_parameters, quantization_config, wrap
from llmtrain.models import DTYPES, load_model, load_tokenizer
from llmtrain.strategies import World

EXAMPLE = "llmtrain finetune configs/lora.yaml training.learning_rate=1e-4 output.dir=runs/lora"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: key.sub=value")


class LossRecorder:
    """Exact per-optimizer-step losses; the Trainer's logged loss is rounded to 4 digits.

    Each rank adds its micro-batches' summed token losses x ranks / step tokens (loss_weighting;
    DDP averages gradients over ranks): the mean over ranks is the step's loss. The same
    all-reduce checks that the loss tokens the ranks saw add up to the count every rank divided
    by: a sharding other than the one loss_weighting assumes would weight the loss wrongly.

    Kept as tensors until a log line needs them: reading a GPU loss every micro-step would
    stall the CPU that queues the next step's kernels."""

    def __init__(self) -> None:
        self.pending: torch.Tensor | float = 0.0
        self.pending_tokens: torch.Tensor | int = 0
        self.step_tokens: int | None = None
        self.steps: list[tuple[torch.Tensor | float, torch.Tensor | int, int | None]] = []

    def add(self, loss: torch.Tensor, tokens: torch.Tensor, step_tokens: int | None) -> None:
        """`loss`: one micro-batch's contribution, as above (fp32 scalar); `tokens`: its
        loss tokens; `step_tokens`: the step's count it was divided by (None: not weighted)."""
        self.pending = self.pending + loss.detach()
        self.pending_tokens = self.pending_tokens + tokens
        self.step_tokens = step_tokens

    def close_step(self) -> None:
        self.steps.append((self.pending, self.pending_tokens, self.step_tokens))
        self.pending, self.pending_tokens, self.step_tokens = 0.0, 0, None

    def drain(self) -> dict[str, Any]:
        steps, self.steps = self.steps, []
        if not steps:
            return {}
        values = torch.tensor(
            [
                [float(loss), float(seen), float(-1 if counted is None else counted)]
                for loss, seen, counted in steps
            ],
            dtype=torch.float64,
        )
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
            world = torch.distributed.get_world_size()
            values = values.to(device)
            torch.distributed.all_reduce(values)
            values = values.cpu()
        for seen, counted in values[:, 1:].tolist():
            if counted >= 0 and seen != counted / world:
                raise RuntimeError(
                    f"an optimizer step's loss was divided by {counted / world:.0f} loss tokens "
                    f"but its micro-batches held {seen:.0f}: the data loader does not shard "
                    "batches as llmtrain.loss_weighting assumes"
                )
        return {"loss_exact": (values[:, 0] / world).tolist()}


class LlmtrainTrainer(Trainer):
    """HF Trainer plus the token-weighted loss of each optimizer step (loss_weighting) and an
    exact loss record; everything else goes through callbacks.

    The training split must be a loss_weighting.StepTokenDataset and the collator a
    StepTokenCollator; `chunked_loss`: the model's forward is fused_loss's (it can sum)."""

    def __init__(
        self, *args: Any, recorder: LossRecorder, chunked_loss: bool, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.recorder = recorder
        self.chunked_loss = chunked_loss

    def training_step(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        loss = super().training_step(model, inputs)
        # Already divided by gradient_accumulation_steps: this rank's share of the step's loss.
        tokens = loss_weighting.loss_tokens(inputs["labels"])
        self.recorder.add(loss, tokens, inputs.get(loss_weighting.STEP_TOKENS))
        return loss

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False) -> Any:
        """Training: sum of the micro-batch's token losses, scaled so that the step's gradient
        is that of (sum over its micro-batches and ranks) / (its loss tokens). Evaluation
        batches carry no step count and keep transformers' per-batch mean."""
        step_tokens = inputs.pop(loss_weighting.STEP_TOKENS, None)
        if step_tokens is None or return_outputs:
            return super().compute_loss(model, inputs, return_outputs)
        total = loss_weighting.token_loss_sum(model, inputs, self.chunked_loss)
        return total * loss_weighting.backward_scale(
            step_tokens, self.args.gradient_accumulation_steps, self.args.world_size
        )

    def create_optimizer(self) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer()
        strategies.drop_empty_param_groups(optimizer)
        return optimizer

    def _get_train_sampler(self) -> loss_weighting.StepTokenSampler:
        dataset = self.train_dataset
        assert isinstance(dataset, loss_weighting.StepTokenDataset)
        step_samples = (
            self._train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
        )
        return loss_weighting.StepTokenSampler(dataset.counts, self.args.seed, step_samples)


class StepBoundary(TrainerCallback):
    """Closes the loss record of each optimizer step."""

    def __init__(self, recorder: LossRecorder) -> None:
        self.recorder = recorder

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.recorder.close_step()


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
    args = TrainingArguments(
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
    return classes[0] if classes else None


def _upcast_trainable(model: Any) -> None:
    """Train adapter weights in fp32 (stable Adam updates); autocast keeps matmuls 16-bit."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def apply_speed_levers(cfg: RunConfig, world: World, model: Any) -> bool:
    """Padding-free attention, compiled block pieces, chunked loss; before the model is wrapped.
    True if the chunked loss is patched in."""
    compiled = cfg.training.compile
    if cfg.data.packing == "padding_free" or (compiled and packing.supports(model)):
        packing.patch_attention(model, compiled_rope=compiled)
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
            packing.PackingCollator()
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


def post_run(cfg: RunConfig, final: Path, out: Path) -> None:
    """Merge (output.merge) and sample generations (generation.samples) from the saved final
    result. The run is finished once `final` is saved: a step that fails here is logged as a
    warning with the command that redoes it, and the run still exits 0, because any other
    code would make the job script requeue (and train again) a run whose result is saved."""
    is_adapter = cfg.method.name in ("lora", "qlora")
    inference_dir = final
    if is_adapter and cfg.output.merge:
        merged = out / "final" / "merged"
        redo = f"llmtrain merge --base {cfg.model.path} --adapter {final} --out {merged}"
        if _attempt("merge", final, redo, lambda: merge(cfg.model, final, merged)):
            inference_dir = merged
    if cfg.generation.samples and cfg.data.shape != "text":
        option = "--adapter" if is_adapter and inference_dir == final else "--model"
        redo = (
            f"llmtrain generate {out / 'config.yaml'} {option} {inference_dir} "
            f"--out {out / 'generations.jsonl'}"
        )
        _attempt("sample generation", final, redo, lambda: _samples(cfg, final, inference_dir, out))


def _attempt(step: str, final: Path, redo: str, work: Callable[[], object]) -> bool:
    """Run one post-run step; any failure is a warning (see post_run). Returns: it worked."""
    try:
        work()
    except Exception as exc:  # any failure: nothing after the final save fails the run
        log.warning(
            "%s after training failed (%s: %s); the final result in %s is saved and complete, "
            "so the run counts as finished (exit 0). To redo it: %s",
            step,
            type(exc).__name__,
            exc,
            final,
            redo,
        )
        return False
    return True


def _samples(cfg: RunConfig, final: Path, inference_dir: Path, out: Path) -> None:
    """generation.samples answers to held-out rows, to generations.jsonl and the log."""
    is_adapter = cfg.method.name in ("lora", "qlora")
    if inference_dir == final and is_adapter:
        model, tok = load_for_inference(cfg.model, final, quantized=cfg.method.name == "qlora")
    else:
        model, tok = load_for_inference(
            cfg.model.model_copy(update={"path": str(inference_dir), "tokenizer": None}), None
        )
    sources, held_out = prompts.held_out_rows(cfg)
    asked = prompts.from_sources(sources, tok, cfg.generation.samples)
    outputs = generate(model, tok, asked.prompts, cfg.generation)
    del model  # one model in memory at a time: the base model is loaded next
    base, _ = load_for_inference(cfg.model, None, quantized=cfg.method.name == "qlora")
    before = generate(base, tok, asked.prompts, cfg.generation)
    write_jsonl(
        out / "generations.jsonl",
        asked.prompts,
        outputs,
        cfg.generation,
        asked.references,
        asked.conversations,
        before=before,
    )
    refs = asked.references or [""] * len(outputs)
    compared = demo_eval.Comparison(asked.prompts, refs, before, outputs, held_out)
    compared.save(out / "samples.json")
    print(compared.table(), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    world = World.from_env()
    # validate's check list, for this machine, before anything is written or loaded; the data
    # is read by the main rank only (the others wait for its prepared data anyway).
    report = run_checks(cfg, gpu=torch.cuda.is_available(), data=world.is_main)
    strategies.check_world(strategies.resolve(cfg, world), world)
    for warning in report.warnings:
        log.warning("%s", warning)
    stopped: str | None = None
    try:
        train(cfg, world)
    except StopRequested as exc:
        # Keep the message only: the traceback's frames hold the Trainer, whose (FSDP or DDP)
        # model holds the process group, which must be gone before the interpreter exits.
        stopped = str(exc)
    finally:
        _close_process_group()
    if stopped is not None:
        raise StopRequested(stopped)
    return 0


def _close_process_group() -> None:
    """A gloo or NCCL thread still alive at interpreter exit aborts the process ("terminate
    called without an active exception"): a finished or stopped run became exit 134 (seen in
    CI on the stop path of FSDP over gloo). Free what still references the process group, so
    its threads are joined now, then destroy it."""
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
