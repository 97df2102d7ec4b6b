"""The checks that `make smoke` and the image's entrypoint run after the work itself.

    python3 -m llmtrain.image_check imports     # the stack imports (the image's build check)
    python3 -m llmtrain.image_check smoke DIR   # a smoke run in DIR trained and saved

They live here rather than in shell heredocs so that the image, `make smoke` in .venv and the
tests run the same code. Exit 0 when the check passes, 1 with the reason on stderr when it
fails, 64 for a wrong command line.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from llmtrain.errors import EXIT_USAGE

# What the image promises to import; flash_attn joins when it is installed (CUDA bases only).
STACK_MODULES = ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed",
                 "sentencepiece", "llmtrain")


def check_imports() -> list[str]:
    """Import every module of the image's stack; return one line per module.

    Raises:
        ImportError: a module of the stack does not import (the build must fail).
    """
    modules = list(STACK_MODULES)
    lines = []
    try:
        metadata.version("flash-attn")
        modules.append("flash_attn")
    except metadata.PackageNotFoundError:
        lines.append("check: flash_attn not installed (BUILD_FLASH_ATTN=0)")
    for name in modules:
        module = importlib.import_module(name)
        lines.append(f"check: import {name} {getattr(module, '__version__', '')}".rstrip())
    return lines


def smoke_problems(out: Path) -> tuple[list[str], str]:
    """What is wrong with the smoke run written to `out`, and a one-line summary of it.

    The run passes when its logged training loss fell from the first to the last logged step
    and its adapter was saved (`final/adapter/adapter_model.safetensors`).
    """
    metrics = out / "metrics.jsonl"
    adapter = out / "final" / "adapter" / "adapter_model.safetensors"
    if not metrics.is_file():
        return [f"no metrics at {metrics}: the run did not start training"], ""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    problems = []
    if len(losses) < 2 or losses[-1][1] >= losses[0][1]:
        problems.append(f"loss did not fall: {losses}")
    if not adapter.is_file():
        problems.append(f"no adapter at {adapter}")
    summary = ""
    if losses:
        summary = (f"loss {losses[0][1]:.3f} (step {losses[0][0]}) -> {losses[-1][1]:.3f} "
                   f"(step {losses[-1][0]}); adapter {adapter}{_exact_match(out)}")
    return problems, summary


def _exact_match(out: Path) -> str:
    """The summary's exact-match part from the run's samples.json (train/demo_eval.py), with
    what the demo is expected to reach; empty where the run generated no samples."""
    samples = out / "samples.json"
    if not samples.is_file():
        return ""
    totals = json.loads(samples.read_text())
    rows = totals["rows"]
    return (f"; exact match {totals['exact_match_before']}/{rows} before training, "
            f"{totals['exact_match_after']}/{rows} after (configs/demo.yaml: about 13 of 16 "
            "after, none before)")


def main(argv: Sequence[str] | None = None) -> int:
    """The command line above; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["imports"]:
        print("\n".join(check_imports()))
        return 0
    if len(args) == 2 and args[0] == "smoke":
        problems, summary = smoke_problems(Path(args[1]))
        if problems:
            print("smoke: FAILED: " + "; ".join(problems), file=sys.stderr)
            return 1
        print(f"smoke: ok: {summary}")
        return 0
    print(__doc__, file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
