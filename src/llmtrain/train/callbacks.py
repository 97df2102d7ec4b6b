"""Trainer callbacks: metrics to JSONL, agreed stopping, committing checkpoints, and the run's
progress lines and summary."""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llmtrain.data.tokenize import TokenizeStats
from llmtrain.train import checkpoints, hf_names

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


def _duration(seconds: float) -> str:
    """H:MM:SS, for ETAs and wall times."""
    s = max(round(seconds), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RunReport(TrainerCallback):
    """What a batch log (Slurm, PBS: stderr is no TTY, so no progress bar) shows of a run: a
    progress line at every log step, and one summary block at the end (`summary`).

    Tokens/s counts the training data's own tokens (no padding): the train split's token count
    times the epochs done in this process, over this process's training time. No collective
    is needed for it, and it is exact at epoch boundaries."""

    def __init__(
        self,
        output_dir: Path,
        train_data: TokenizeStats,
        parameters: tuple[int, int],
        *,
        progress_lines: bool,
    ) -> None:
        self.output_dir = output_dir
        self.train_data = train_data
        self.train_tokens = train_data.tokens
        self.parameters = parameters  # (trainable, total)
        self.progress_lines = progress_lines
        self.evaluates = False
        self.start: tuple[float, int, float] | None = None  # (time, step, epoch) at train start
        self.end: tuple[float, int, float] | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        # After a resume the Trainer has restored state.global_step and state.epoch here.
        self.start = (time.monotonic(), state.global_step, state.epoch or 0.0)
        self.evaluates = hf_names.eval_strategy(args) != "no"

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        # The final model's eval loss, not the one of the last eval_steps multiple before it.
        if self.evaluates and state.global_step >= state.max_steps:
            control.should_evaluate = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any
    ) -> None:
        self.end = (time.monotonic(), state.global_step, state.epoch or 0.0)

    def _rate(self, now: float, step: int, epoch: float) -> tuple[float, float] | None:
        """(tokens/s, s/step) over this process's steps so far, or None before the first."""
        if self.start is None or step <= self.start[1] or now <= self.start[0]:
            return None
        elapsed = now - self.start[0]
        tokens = self.train_tokens * (epoch - self.start[2])
        return tokens / elapsed, elapsed / (step - self.start[1])

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kw: Any,
    ) -> None:
        if not (self.progress_lines and state.is_world_process_zero and logs):
            return
        step, total = state.global_step, state.max_steps
        if "loss" in logs:
            parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)",
                     f"loss {logs['loss']:.4f}"]
            if "learning_rate" in logs:
                parts.append(f"lr {logs['learning_rate']:.3g}")
            rate = self._rate(time.monotonic(), step, state.epoch or 0.0)
            if rate is not None:
                parts += [f"{rate[0]:,.0f} tokens/s", f"eta {_duration(rate[1] * (total - step))}"]
            log.info("%s", ", ".join(parts))
        elif "eval_loss" in logs:
            log.info("step %d/%d: eval loss %.4f", step, total, logs["eval_loss"])

    def summary(self, method: str, outputs: dict[str, Path]) -> str:
        """The run summary block: method, data kept and dropped, losses, time, throughput,
        outputs. `outputs` maps a name to a path, listed in order; those that do not exist
        are left out."""
        records = _metric_records(self.output_dir / METRICS)
        train = [r["loss"] for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        trainable, total = self.parameters
        lines = [
            f"method: {method}, {trainable:,} of {total:,} parameters trained "
            f"({100 * trainable / max(total, 1):.3f}%)",
            f"data: {self.train_data.summary()}",
        ]
        if train:
            lines.append(f"loss: {train[0]:.4f} -> {train[-1]:.4f} ({len(train)} log steps)")
        if evals:
            best = min(evals, key=lambda e: e[1])
            lines.append(
                f"eval loss: {evals[0][1]:.4f} -> {evals[-1][1]:.4f} at step {evals[-1][0]} "
                f"(lowest {best[1]:.4f} at step {best[0]})"
            )
        if self.start is not None and self.end is not None:
            rate = self._rate(*self.end)
            steps = self.end[1] - self.start[1]
            speed = f", {rate[0]:,.0f} tokens/s" if rate is not None else ""
            lines.append(
                f"time: {_duration(self.end[0] - self.start[0])} for {steps} steps{speed}"
            )
        lines.append("outputs:")
        lines += [f"  {name}: {path}" for name, path in outputs.items() if path.exists()]
        return "\n".join(["run summary", *(f"  {line}" for line in lines)])


def _metric_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
