"""`llmtrain validate`: check a run before any GPU is allocated (CPU, no weights loaded)."""

from __future__ import annotations

import argparse
import sys

from llmtrain import sizing
from llmtrain.checks import run_checks
from llmtrain.config import load_config
from llmtrain.gpus import PRESETS

EXAMPLE = "llmtrain validate configs/lora.yaml data.path=data/train.jsonl"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: key.sub=value")
    parser.add_argument(
        "--assume-gpu",
        action="store_true",
        help="check GPU-only settings (qlora, bf16) as if on a GPU node",
    )
    parser.add_argument(
        "--gpu", default="h100", help=f"GPU preset for the memory check: {', '.join(PRESETS)}"
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    report = run_checks(cfg, assume_gpu=args.assume_gpu)
    lines = sizing.summary(cfg, args.gpu, args.nodes, args.gpus_per_node)
    warnings = (
        []
        if sizing.fits(cfg, args.gpu, args.nodes, args.gpus_per_node)
        else [
            f"the run is estimated not to fit a {args.gpu} GPU: see `llmtrain estimate "
            f"{args.config}` for strategies and micro-batches that do"
        ]
    )
    for line in report.lines + lines:
        print(line)
    for warning in report.warnings + warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {args.config} is valid")
    return 0
