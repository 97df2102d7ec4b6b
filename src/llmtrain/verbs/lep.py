"""`llmtrain lep`: Learned Embedding Propagation into the instruct model (arXiv 2412.21140)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from llmtrain.vocab.kinds import MODES

log = logging.getLogger(__name__)

EXAMPLE = (
    "llmtrain lep --base /models/Mistral-7B --adapted runs/mistral-ru-emb/final/model "
    "--instruct /models/Mistral-7B-Instruct --mode conversion --out mistral-ru-instruct"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="the base model before adaptation")
    parser.add_argument(
        "--adapted",
        type=Path,
        required=True,
        help="the base model with the new vocabulary and trained embeddings",
    )
    parser.add_argument(
        "--instruct", type=Path, required=True, help="the instruct model made from --base"
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="conversion",
        help="conversion: fit the base->instruct map on subtoken means of the new vocabulary; "
        "overlap: fit it on tokens both vocabularies share; swap: copy the adapted rows",
    )
    parser.add_argument("--out", type=Path, required=True, help="instruct model directory to write")


def run(args: argparse.Namespace) -> int:
    from llmtrain.vocab.propagate import propagate_to_instruct

    propagate_to_instruct(args.base, args.adapted, args.instruct, args.mode, args.out)
    log.info("wrote %s", args.out)
    return 0
