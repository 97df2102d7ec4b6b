"""`llmtrain env`: print the provenance manifest of this environment as JSON."""

from __future__ import annotations

import argparse
import json

from llmtrain import manifest

EXAMPLE = "llmtrain env > manifest.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--short", action="store_true", help="only the package versions")


def run(args: argparse.Namespace) -> int:
    info = manifest.build()
    print(json.dumps(info["packages"] if args.short else info, indent=2, sort_keys=True))
    return 0
