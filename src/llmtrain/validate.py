"""`llmtrain validate`: check a run before any GPU is allocated (CPU, no weights loaded)."""

from __future__ import annotations

import argparse
import sys

from llmtrain.checks import run_checks
from llmtrain.config import load_config

EXAMPLE = "llmtrain validate configs/lora.yaml data.path=data/train.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: key.sub=value")
    parser.add_argument(
        "--assume-gpu", action="store_true",
        help="check GPU-only settings (qlora, bf16) as if on a GPU node",
    )


def _estimate_lines(cfg: object) -> tuple[list[str], list[str]]:
    """The memory estimate's short form, when the estimator is installed and can read the model."""
    try:
        from llmtrain import estimate
    except ImportError:
        return [], []
    return estimate.summary(cfg), estimate.warnings(cfg)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    report = run_checks(cfg, assume_gpu=args.assume_gpu)
    lines, warnings = _estimate_lines(cfg)
    for line in report.lines + lines:
        print(line)
    for warning in report.warnings + warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {args.config} is valid")
    return 0
