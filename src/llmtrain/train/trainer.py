"""The HF Trainer as llmtrain runs it: the token-weighted loss of each optimizer step and an
exact per-step loss record (LossRecorder, closed at each step by StepBoundary)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from llmtrain import compat, stack
from llmtrain.train import hf_names, loss_weighting
from llmtrain.train.master_weights import MasterWeights
from llmtrain.train.token_budget import TokenBudget

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # under output.dir: TensorBoard's event files


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
                    "batches as llmtrain.train.loss_weighting assumes"
                )
        return {"loss_exact": (values[:, 0] / world).tolist()}


class LlmtrainTrainer(Trainer):
    """HF Trainer plus the token-weighted loss of each optimizer step (loss_weighting) and an
    exact loss record; everything else goes through callbacks.

    The training split must be a loss_weighting.StepTokenDataset and the collator a
    StepTokenCollator; `chunked_loss`: the model's forward is fused_loss's (it can sum);
    `token_budget`: the plan of token-budget micro-batches (training.tokens_per_batch), whose
    args must then carry per_device_train_batch_size=1 and its gradient_accumulation_steps."""

    # transformers >= 4.46 divides compute_loss's result by the accumulation steps unless told
    # it is scaled already; ours is (backward_scale), on the current stack without the division
    # (5.x also turns off accelerate's and DeepSpeed's own division). 4.37.2 ignores this flag.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        *args: Any,
        recorder: LossRecorder,
        chunked_loss: bool,
        token_budget: TokenBudget | None = None,
        master_weights: MasterWeights | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        hf_names.tensorboard_to(
            self.callback_handler.callbacks, str(Path(self.args.output_dir, TENSORBOARD_DIR))
        )
        self.recorder = recorder
        self.chunked_loss = chunked_loss
        self.token_budget = token_budget
        self.master_weights = master_weights

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any) -> torch.Tensor:
        # FSDP on one GPU (NO_SHARD): frozen units' weights stay Parameters across forwards.
        compat.fsdp_no_shard_frozen_views(model)
        loss = super().training_step(model, inputs, *args)  # 5.x passes num_items_in_batch
        if self.master_weights is not None:
            self.master_weights.accumulate()  # this micro-batch's bf16 grads, summed in fp32
        # Already divided by gradient_accumulation_steps: this rank's share of the step's loss.
        tokens = loss_weighting.loss_tokens(inputs["labels"])
        self.recorder.add(loss, tokens, inputs.get(loss_weighting.STEP_TOKENS))
        return loss

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        """Training: sum of the micro-batch's token losses, scaled so that the step's gradient
        is that of (sum over its micro-batches and ranks) / (its loss tokens). Evaluation
        batches carry no step count and keep transformers' per-batch mean."""
        step_tokens = inputs.pop(loss_weighting.STEP_TOKENS, None)
        if step_tokens is None or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, **kwargs)
        total = loss_weighting.token_loss_sum(model, inputs, self.chunked_loss)
        # Pinned: accelerate (or DeepSpeed) divides by the accumulation steps; current: nothing
        # does (loss_is_scaled_for_ga), so the factor that undoes that division is 1.
        accumulation = 1 if stack.is_current() else self.args.gradient_accumulation_steps
        return total * loss_weighting.backward_scale(
            step_tokens, accumulation, self.args.world_size
        )

    def create_optimizer(self, *args: Any) -> torch.optim.Optimizer:
        # 5.x passes the accelerate-prepared model when it creates the optimizer after wrapping
        # (FSDP1); 4.37.2 takes no argument.
        optimizer = super().create_optimizer(*args)
        compat.drop_empty_param_groups(optimizer)
        if self.master_weights is not None:
            self.master_weights.attach(optimizer)
        return optimizer

    def _save_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        # FSDP on one GPU (NO_SHARD): frozen units' weights back as Parameters for the state dict.
        compat.fsdp_no_shard_frozen_views(self.model_wrapped)
        return super()._save_checkpoint(*args, **kwargs)

    def get_train_dataloader(self) -> Any:
        """The Trainer's loader, except that its batches stay on the host (pinned) for
        _prepare_input to copy: accelerate's device placement copies them with a blocking
        `.to(device)`, a host sync that lets the GPU's queue run dry at every micro-batch."""
        loader = super().get_train_dataloader()
        if self.args.dataloader_pin_memory and self.args.device.type == "cuda":
            loader.device = None  # accelerate's DataLoaderShard: None keeps batches where they are
        return loader

    def _prepare_input(self, data: Any) -> Any:
        """A pinned integer tensor goes to the GPU without a host sync (non_blocking); the
        copy is stream-ordered before the forward that reads it. Everything else as HF does."""
        if isinstance(data, torch.Tensor) and data.is_pinned() and not data.is_floating_point():
            return data.to(self.args.device, non_blocking=True)
        return super()._prepare_input(data)

    def _get_train_sampler(self, *args: Any) -> torch.utils.data.Sampler[Any]:
        dataset = self.train_dataset  # 5.x passes it; it is always this one
        assert isinstance(dataset, loss_weighting.StepTokenDataset)
        if self.token_budget is not None:
            return self.token_budget.sampler()
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
