"""`llmtrain merge`: base model plus LoRA adapter -> one safetensors model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmtrain.config import ModelSection

EXAMPLE = (
    "llmtrain merge --base embedded:tiny-llama --adapter runs/lora/final/adapter "
    "--out runs/lora/merged"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model: directory, hub id, embedded:")
    parser.add_argument("--adapter", required=True, type=Path, help="LoRA adapter directory")
    parser.add_argument("--out", required=True, type=Path, help="output model directory")
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default="float32",
        help="dtype of the merged weights (default float32)",
    )


def run(args: argparse.Namespace) -> int:
    from llmtrain.model.export import merge
    from llmtrain.model.load import DTYPES

    merge(ModelSection(path=args.base), args.adapter, args.out, DTYPES[args.dtype])
    print(args.out)
    return 0
