"""TrainingArguments as each stack names them. The package speaks the pinned stack's names
(transformers 4.37.2); on the current stack (5.x) this module renames what 5.x renamed or
removed. The one place such renames live, so that they drop out with the pinned stack."""

from __future__ import annotations

from typing import Any

from llmtrain import stack


def training_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` for TrainingArguments(...) in the installed release's names.

    Current stack: evaluation_strategy is eval_strategy (renamed in 4.41); warmup_ratio is
    gone (5.0), warmup_steps below 1 is the ratio; logging_dir is gone (5.0): see
    tensorboard_to.
    """
    if not stack.is_current():
        return kwargs
    out = dict(kwargs)
    if "evaluation_strategy" in out:
        out["eval_strategy"] = out.pop("evaluation_strategy")
    ratio = out.pop("warmup_ratio", 0.0) or 0.0
    if ratio and not out.get("warmup_steps"):
        out["warmup_steps"] = float(ratio)
    out.pop("logging_dir", None)
    return out


def tensorboard_to(callbacks: list[Any], logging_dir: str) -> None:
    """Point the Trainer's TensorBoard callback at `logging_dir` on the current stack.

    5.x's TensorBoardCallback reads its directory from TENSORBOARD_LOGGING_DIR when it is built
    and otherwise writes under output_dir/runs/. Setting that variable in os.environ would
    outlive the run: a second run in the same process (or any program it starts) would write
    its events into the first run's directory. A directory the user gave in the variable stays
    theirs. The pinned stack reads TrainingArguments.logging_dir itself: nothing to do there."""
    if not stack.is_current():
        return
    from transformers.integrations import TensorBoardCallback

    for callback in callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = logging_dir


def fsdp_plugin(args: Any) -> Any:
    """accelerate's FSDP plugin for a TrainingArguments' FSDP settings, built as its Trainer
    builds it: 5.x from args.fsdp_plugin_args (FSDP2 unless fsdp_config names version 1);
    4.37.2 hands the settings over in FSDP_* environment variables, which the plugin reads,
    all but limit_all_gathers."""
    from accelerate import FullyShardedDataParallelPlugin

    if stack.is_current():
        return FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    plugin = FullyShardedDataParallelPlugin()
    plugin.limit_all_gathers = args.fsdp_config.get("limit_all_gathers", False)
    return plugin


def eval_strategy(args: Any) -> str:
    """The evaluation strategy of a TrainingArguments of either stack, as a string."""
    value = getattr(args, "eval_strategy", None) or getattr(args, "evaluation_strategy", "no")
    return str(getattr(value, "value", value))
