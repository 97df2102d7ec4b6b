"""`llmtrain prepare`: tokenize once and save, so no tokenization runs inside a distributed job."""

from __future__ import annotations

import argparse
import json

from llmtrain.config import load_config

EXAMPLE = "llmtrain prepare configs/lora.yaml data.prepared_dir=/scratch/me/prepared"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: key.sub=value")


def run(args: argparse.Namespace) -> int:
    from llmtrain.data import prepared
    from llmtrain.model.device import this_machine
    from llmtrain.model.load import load_tokenizer
    from llmtrain.sizing.gpus import DEFAULT_GPU, get_gpu
    from llmtrain.train.checks import needs_gpu, run_checks

    cfg = load_config(args.config, args.overrides)
    # validate's check list; like validate, for the GPU node the config needs (prepare runs
    # on a login node too).
    here = this_machine()
    login = needs_gpu(cfg) and not here.cuda
    run_checks(cfg, target=get_gpu(DEFAULT_GPU).node() if login else here, trains_here=False)
    info = prepared.prepare(cfg, load_tokenizer(cfg.model))
    print(json.dumps({"prepared_dir": str(cfg.prepared_dir()), **info}, indent=2))
    return 0
