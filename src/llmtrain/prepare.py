"""`llmtrain prepare`: tokenize once and save, so no tokenization runs inside a distributed job."""

from __future__ import annotations

import argparse
import json

from llmtrain import prepared
from llmtrain.checks import check_model
from llmtrain.config import load_config
from llmtrain.data import check_templates, load_rows

EXAMPLE = "llmtrain prepare configs/lora.yaml data.prepared_dir=/scratch/me/prepared"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: key.sub=value")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    _, tokenizer, _ = check_model(cfg)
    check_templates(cfg.data, load_rows(cfg.data))
    info = prepared.prepare(cfg, tokenizer)
    print(json.dumps({"prepared_dir": str(cfg.prepared_dir()), **info}, indent=2))
    return 0
