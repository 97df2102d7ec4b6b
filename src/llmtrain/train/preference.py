"""Preference tuning (method dpo, orpo) in llmtrain's own loop, with TRL 0.8.6's losses.

TRL's DPOTrainer and ORPOTrainer are not used as trainers: they tokenize prompt and answer
apart (the boundary piece SentencePiece adds, see data/encode.py), draw batches with
transformers' RandomSampler from the global RNG (another order after a resume), and average
each micro-batch's loss on its own. Their losses (`DPOTrainer.dpo_loss`,
`ORPOTrainer.odds_ratio_loss`, `get_batch_logps` of TRL 0.8.6) are reproduced in
preference_loss, which runs on both stacks (TRL 1.x no longer has them as functions), inside
LlmtrainTrainer: the epoch-seeded sampler, the step-weighted loss (a step's loss is the mean
over all its pairs, micro-batches and ranks), checkpoints, stop and resume, the manifest and
the metrics are the SFT path's.

One batch holds the chosen samples then the rejected ones ([2B, L], padded together); one
forward of the policy gives both log-probabilities. DPO's reference is the same model with the
LoRA adapter disabled (no second copy), or for full weights a frozen copy of the base model.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback

from llmtrain import compat, manifest, stack
from llmtrain.config import (
    PREFERENCE_METHODS,
    MethodSection,
    PreferenceSection,
    RunConfig,
    dump_config,
)
from llmtrain.data import chat, prepared
from llmtrain.data.collate import PadCollator
from llmtrain.data.preference import SIDES
from llmtrain.errors import ConfigError, StopRequested
from llmtrain.kernels import lora as fused_lora
from llmtrain.model.load import DTYPES, load_model, load_tokenizer
from llmtrain.model.methods import count_parameters, wrap
from llmtrain.plan import RunPlan, World, launcher_strategy
from llmtrain.train import checkpoints, loss_weighting, preference_loss, run, strategies
from llmtrain.train.callbacks import (
    CommitCheckpointCallback,
    MetricsCallback,
    RunReport,
    StopCallback,
    truncate_metrics,
)
from llmtrain.train.token_budget import StepChunk
from llmtrain.train.trainer import LlmtrainTrainer, LossRecorder, StepBoundary

log = logging.getLogger(__name__)
WEIGHT = "pair_weight"  # 1 for a pair, 0 for the sampler's filler (loss_weighting.FILLER)
STRATEGIES = ("auto", "ddp")
METRIC_KEYS = {
    "dpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"),
    "orpo": ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio"),
}


def policy_config(cfg: RunConfig) -> RunConfig:
    """The run as the SFT code paths see the trained model: method.name is preference.weights
    (lora or full), so wrapping, dtypes, strategies, the final save, merge and generate treat
    it as that method; the chunked loss is off (preference losses need per-token log-probs).
    Any other method: `cfg` itself."""
    if cfg.method.name not in PREFERENCE_METHODS:
        return cfg
    return cfg.model_copy(
        update={
            "method": MethodSection(name=cfg.preference.weights),
            "training": cfg.training.model_copy(update={"chunked_loss": False}),
        }
    )


def check(cfg: RunConfig) -> None:
    """The settings preference tuning supports (validate, prepare and finetune run this).

    Raises:
        ConfigError: padding-free packing, a sharded strategy (exit 64).
    """
    if cfg.method.name not in PREFERENCE_METHODS:
        return
    method = cfg.method.name
    if cfg.data.packing != "none":
        raise ConfigError(
            f"data.packing={cfg.data.packing} is not supported for method {method}: a pair's "
            "chosen and rejected samples are padded into one batch and scored per sequence; "
            "packed (padding-free) pairs are not implemented",
            "set data.packing=none",
        )
    strategy = cfg.distributed.strategy
    launched = launcher_strategy() if strategy == "auto" else None
    if strategy not in STRATEGIES or launched not in (None, "ddp"):
        raise ConfigError(
            f"distributed.strategy={launched or strategy} with method {method} is not tested: "
            "only one process or DDP are (full-weight DPO keeps an unsharded reference copy on "
            "every rank, and the LoRA reference runs the model with the adapter disabled, "
            "which FSDP and ZeRO-3 shards were not checked with)",
            "use distributed.strategy=ddp (or auto under torchrun)",
        )


@dataclass
class PairCollator:
    """Pairs -> one batch: the B chosen samples, then the B rejected ones ([2B, L] input_ids,
    attention_mask, labels; padded by PadCollator), and `pair_weight` (fp32 [B])."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        samples = [
            {"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]}
            for side in SIDES
            for f in features
        ]
        batch = PadCollator(self.pad_token_id)(samples)
        batch[WEIGHT] = torch.tensor([float(f.get(WEIGHT, 1.0)) for f in features])
        return batch


class PairStepDataset(loss_weighting.StepTokenDataset):
    """The training pairs read through StepItems: every pair counts 1 towards its step (the
    step's loss is the mean over its pairs); the filler is pair 0 with weight 0."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self.counts = np.ones(len(base), dtype=np.int64)

    def __getitem__(self, item: loss_weighting.StepItem | StepChunk) -> dict[str, Any]:
        # Token-budget chunks need padding-free packing, which check() refuses for pairs.
        assert isinstance(item, loss_weighting.StepItem)
        row = dict(self.base[max(item.row, 0)])
        row[WEIGHT] = 0.0 if item.row == loss_weighting.FILLER else 1.0
        row[loss_weighting.STEP_TOKENS] = item.step_tokens
        return row


def pair_losses(
    method: str,
    cfg: PreferenceSection,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses ([B]) and metrics ([B] each), by preference_loss (TRL 0.8.6's math).

    Args:
        method: dpo or orpo. cfg: the PreferenceSection.
        chosen, rejected: the policy's log-probabilities of each answer ([B], float; fp32 in
            training); dpo: summed over the answer's tokens, orpo: their mean.
        ref_chosen, ref_rejected: the reference model's (dpo only; None for orpo).
    """
    metrics = {"logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
    if method == "dpo":
        assert ref_chosen is not None and ref_rejected is not None
        losses, r_chosen, r_rejected = preference_loss.dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected,
            beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
        )
    else:
        losses, r_chosen, r_rejected = preference_loss.orpo_loss(chosen, rejected, beta=cfg.beta)
        metrics["nll_loss"] = -chosen.detach()
        with torch.no_grad():
            log_odds = preference_loss.log_odds_ratio(chosen, rejected)
        metrics["log_odds_ratio"] = torch.nn.functional.logsigmoid(log_odds)
    metrics.update({
        "rewards/chosen": r_chosen,
        "rewards/rejected": r_rejected,
        "rewards/margins": r_chosen - r_rejected,
        "rewards/accuracies": (r_chosen > r_rejected).float(),
    })
    return losses, metrics


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool) -> torch.Tensor:
    """Log-probability of each sequence's labelled tokens (fp32 [N]) from logits [N, L, V]
    upcast to fp32: preference_loss.sequence_logps (shift by one, -100 ignored), summed or
    (`average`) their mean."""
    return preference_loss.sequence_logps(logits.float(), labels, average=average)


class PreferenceTrainer(LlmtrainTrainer):
    """LlmtrainTrainer whose loss is DPO's or ORPO's over pairs (see the module docstring).

    `reference`: DPO's frozen reference model for full weights; None for LoRA (the adapter is
    disabled instead) and for ORPO (no reference). Reward metrics are averaged over the pairs
    since the last log line, over all ranks, and logged with the loss (metrics.jsonl and
    TensorBoard go through the Trainer's log)."""

    def __init__(
        self, *args: Any, cfg: RunConfig, reference: torch.nn.Module | None, **kwargs: Any
    ) -> None:
        super().__init__(*args, chunked_loss=False, **kwargs)
        self.method = cfg.method.name
        self.preference = cfg.preference
        self.reference = reference
        self.sums: dict[str, dict[str, torch.Tensor]] = {}

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any) -> torch.Tensor:
        # Not LlmtrainTrainer's: a step is counted in pairs, not label tokens. `args`: 5.x
        # passes num_items_in_batch (a label-token count), which the pair loss does not use.
        loss = Trainer.training_step(self, model, inputs, *args)
        pairs = inputs[WEIGHT].sum().to(torch.int64)
        self.recorder.add(loss, pairs, inputs.get(loss_weighting.STEP_TOKENS))
        return loss

    def _reference_logps(
        self, model: Any, batch: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                logits = self.reference(**batch).logits
            else:
                unwrapped = self.accelerator.unwrap_model(model)
                with unwrapped.disable_adapter():
                    logits = unwrapped(**batch).logits
            return sequence_logps(logits, labels, average=False)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        """Training: the sum of the micro-batch's pair losses, scaled so that the step's
        gradient is that of their mean over the step's pairs (all micro-batches and ranks).
        Evaluation (no step count): the batch's mean pair loss."""
        step_pairs = inputs.pop(loss_weighting.STEP_TOKENS, None)
        weight = inputs.pop(WEIGHT).float()
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        logps = sequence_logps(logits, labels, average=self.method == "orpo")
        n = weight.shape[0]
        ref = self._reference_logps(model, inputs, labels) if self.method == "dpo" else None
        losses, metrics = pair_losses(
            self.method,
            self.preference,
            logps[:n],
            logps[n:],
            None if ref is None else ref[:n],
            None if ref is None else ref[n:],
        )
        self._store(metrics, weight, "eval_" if step_pairs is None else "")
        total = (losses * weight).sum()
        if step_pairs is None:
            loss = total / weight.sum().clamp(min=1)
        else:
            # As LlmtrainTrainer.compute_loss: on the pinned stack accelerate divides the loss
            # by the accumulation steps, on the current one nothing does (loss_is_scaled_for_ga).
            accumulation = 1 if stack.is_current() else self.args.gradient_accumulation_steps
            loss = total * loss_weighting.backward_scale(
                step_pairs, accumulation, self.args.world_size
            )
        return (loss, None) if return_outputs else loss

    def prediction_step(
        self,
        model: Any,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _store(self, metrics: dict[str, torch.Tensor], weight: torch.Tensor, prefix: str) -> None:
        sums = self.sums.setdefault(prefix, {})
        for key in (*METRIC_KEYS[self.method], "pairs"):
            value = weight.sum() if key == "pairs" else (metrics[key].float() * weight).sum()
            sums[key] = sums.get(key, 0) + value.detach()

    def log(self, logs: dict[str, float], *args: Any) -> None:
        """Adds the reward metrics since the last log line to the Trainer's: training ones to
        a line with `loss`, evaluation ones (eval_ prefix) to a line with `eval_loss`. `args`:
        5.x's start_time, passed on."""
        prefix = "eval_" if "eval_loss" in logs else "" if "loss" in logs else None
        sums = self.sums.pop(prefix, None) if prefix is not None else None
        if sums and prefix is not None:
            keys = list(METRIC_KEYS[self.method])
            values = torch.stack([sums[k].float() for k in [*keys, "pairs"]]).double()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                values = values.to(self.args.device)
                torch.distributed.all_reduce(values)
            values = values.cpu()
            pairs = max(float(values[-1]), 1.0)
            logs.update({prefix + k: float(v) / pairs for k, v in zip(keys, values, strict=False)})
        super().log(logs, *args)


def load_reference(cfg: RunConfig, plan: RunPlan) -> torch.nn.Module | None:
    """DPO with full weights: a frozen copy of the base model in eval mode, in the compute
    dtype (16 bits under bf16/fp16: it is never trained); else None."""
    if cfg.method.name != "dpo" or cfg.preference.weights != "full":
        return None
    dtype = (
        DTYPES[cfg.model.dtype] if cfg.model.dtype != "auto"
        else torch.float32 if plan.precision == "fp32" else DTYPES[plan.compute_dtype]
    )
    reference = load_model(cfg.model, dtype=dtype, attn_implementation=plan.attention)
    reference.eval()
    reference.requires_grad_(False)
    return reference


def train(cfg: RunConfig, world: World, extra_callbacks: Sequence[TrainerCallback] = ()) -> Any:
    """run.train for method dpo and orpo: the same build -> train -> save, with pairs, the
    PreferenceTrainer and DPO's reference model. Returns the Trainer.

    Raises:
        ConfigError, DataError, StopRequested: as run.train (exit 64, 65, 75).
    """
    policy = policy_config(cfg)
    plan = run.plan_run(policy, world)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.model)
    if cfg.data.shape == "chat":
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

    set_seed(cfg.training.seed)  # before the model is built: LoRA's initial weights
    log.info("plan:\n%s", "\n".join(plan.lines()))
    model = load_model(
        cfg.model, dtype=DTYPES[plan.weight_dtype], attn_implementation=plan.attention
    )
    block_class = run._block_class(model)
    run.apply_speed_levers(policy, plan, model)
    model = wrap(
        model, policy.method, cfg.lora, gradient_checkpointing=cfg.training.gradient_checkpointing
    )
    if plan.adapter:
        run._upcast_trainable(model)
    if plan.fused_lora:
        fused_lora.patch(model)  # its forward honours disable_adapter (DPO's reference)
    # The reference in the weights' dtype; the Trainer does not move it, so it goes to the
    # device here.
    reference = load_reference(cfg, plan)

    args = run.training_arguments(policy, world, plan, out, "eval" in splits, block_class)
    if reference is not None:
        reference.to(args.device)
    stop = StopCallback(
        stop_file=Path(world.stop_file) if world.stop_file else None,
        deadline=world.deadline,
        margin_s=world.deadline_margin_s,
        every=world.stop_check_steps,
    )
    stop.install_signal_handlers()
    recorder = LossRecorder()
    batch_log = not sys.stderr.isatty()
    report = RunReport(
        out, prepared.train_stats(cfg.prepared_dir()), count_parameters(model),
        progress_lines=batch_log,
    )
    trainer = PreferenceTrainer(
        model=model,
        args=args,
        train_dataset=PairStepDataset(splits["train"]),
        eval_dataset=splits.get("eval"),
        data_collator=loss_weighting.StepTokenCollator(PairCollator(tokenizer.pad_token_id)),
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
        cfg=cfg,
        reference=reference,
    )
    if batch_log:
        trainer.remove_callback(PrinterCallback)
    strategies.prepare_trainer(trainer, policy)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if stop.reason is not None:
        raise StopRequested(f"{stop.reason}; checkpoint at step {trainer.state.global_step}")
    final = run.save_final(policy, plan, world, trainer, tokenizer, out)
    if world.is_main:
        log.info("%s", report.summary(cfg.method.name, run.summary_outputs(out, final)))
    return trainer
