"""TrainingArguments as each stack names them. The package speaks the pinned stack's names
(transformers 4.37.2); on the current stack (5.x) this module renames what 5.x renamed or
removed. The one place such renames live, so that they drop out with the pinned stack."""

from __future__ import annotations

import os
from typing import Any

from llmtrain import stack


def training_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` for TrainingArguments(...) in the installed release's names.

    Current stack: evaluation_strategy is eval_strategy (renamed in 4.41); warmup_ratio is
    gone (5.0), warmup_steps below 1 is the ratio; logging_dir is gone (5.0), the TensorBoard
    callback reads TENSORBOARD_LOGGING_DIR (set here unless the user set it).
    """
    if not stack.is_current():
        return kwargs
    out = dict(kwargs)
    if "evaluation_strategy" in out:
        out["eval_strategy"] = out.pop("evaluation_strategy")
    ratio = out.pop("warmup_ratio", 0.0) or 0.0
    if ratio and not out.get("warmup_steps"):
        out["warmup_steps"] = float(ratio)
    logging_dir = out.pop("logging_dir", None)
    if logging_dir is not None:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(logging_dir))
    return out


def eval_strategy(args: Any) -> str:
    """The evaluation strategy of a TrainingArguments of either stack, as a string."""
    value = getattr(args, "eval_strategy", None) or getattr(args, "evaluation_strategy", "no")
    return str(getattr(value, "value", value))
