"""Trainer callbacks: metrics to JSONL, agreed stopping, and committing checkpoints."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llmtrain import checkpoints

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: ranks stop together or not at all."""
    if not _dist_ready():
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _barrier() -> None:
    if _dist_ready():
        dist.barrier()


class MetricsCallback(TrainerCallback):
    """Appends every log record, with its step, to <output>/metrics.jsonl (main process)."""

    def __init__(self, output_dir: Path, extra: Callable[[], dict[str, Any]]) -> None:
        self.path = output_dir / METRICS
        self.extra = extra

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs:
            return
        # Every rank takes part: `extra` may run a collective (the exact loss's mean).
        extra = self.extra() if "loss" in logs else {}
        if not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs, **extra}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def truncate_metrics(output_dir: Path, step: int) -> None:
    """On resume, drop records past the checkpoint: those steps run again."""
    path = output_dir / METRICS
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    checkpoints.atomic_write(path, "".join(f"{line}\n" for line in kept))


class StopCallback(TrainerCallback):
    """Stops all ranks together, after a checkpoint, on SIGUSR1/SIGTERM, a stop file, or a
    deadline. Ranks agree through one tiny all-reduce every `every` steps."""

    def __init__(
        self,
        stop_file: Path | None,
        deadline: float | None,
        margin_s: float,
        every: int,
    ) -> None:
        self.stop_file = stop_file
        self.deadline = deadline
        self.margin_s = margin_s
        self.every = max(every, 1)
        self.signalled: int | None = None
        self.reason: str | None = None

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = signum

    def _local_reason(self) -> str | None:
        if self.signalled is not None:
            return f"signal {signal.Signals(self.signalled).name}"
        if self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        if self.deadline is not None and time.time() > self.deadline - self.margin_s:
            return f"deadline in less than {self.margin_s:.0f}s"
        return None

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if state.global_step % self.every:
            return
        local = self._local_reason()
        if _any_rank(local is not None):
            self.reason = local or "another rank asked to stop"
            log.warning("stopping at step %d: %s", state.global_step, self.reason)
            control.should_save = True
            control.should_training_stop = True


class CommitCheckpointCallback(TrainerCallback):
    """After the Trainer wrote checkpoint-N on every rank: flush, agree, mark it complete,
    point `latest` at it, then apply retention by step number."""

    def __init__(
        self, output_dir: Path, keep: int, facts: dict[str, Any], *, keep_best: bool = True
    ) -> None:
        self.output_dir = output_dir
        self.keep = keep
        self.facts = facts
        self.keep_best = keep_best
        self.eval_loss: tuple[int, float] | None = None  # (step, loss) of the latest eval

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if metrics and "eval_loss" in metrics:
            self.eval_loss = (state.global_step, float(metrics["eval_loss"]))

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        ckpt = self.output_dir / f"checkpoint-{state.global_step}"
        if args.local_process_index == 0 and ckpt.is_dir():
            checkpoints.flush_tree(ckpt)
        _barrier()
        if state.is_world_process_zero:
            facts = {**self.facts, "step": state.global_step}
            if self.eval_loss is not None and self.eval_loss[0] == state.global_step:
                facts["eval_loss"] = self.eval_loss[1]  # HF evaluates before it saves
            checkpoints.mark_complete(ckpt, facts)
            if (best := checkpoints.record_best(self.output_dir)) is not None:
                log.info("best checkpoint so far: %s (eval loss %.4f)", best[0].name, best[1])
            for gone in checkpoints.retain(self.output_dir, self.keep, keep_best=self.keep_best):
                log.info("retention: removed %s", gone.name)
        _barrier()


def deadline_from_env() -> float | None:
    value = os.environ.get("LLMTRAIN_DEADLINE")
    return float(value) if value else None
