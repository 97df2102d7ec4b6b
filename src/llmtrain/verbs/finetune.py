"""`llmtrain finetune`: parse -> check -> train -> close. One loop for every method and strategy."""

from __future__ import annotations

import argparse
import logging

from llmtrain.config import PREFERENCE_METHODS, load_config
from llmtrain.errors import StopRequested
from llmtrain.plan import World

EXAMPLE = "llmtrain finetune configs/lora.yaml training.learning_rate=1e-4 output.dir=runs/lora"
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: key.sub=value")


def run(args: argparse.Namespace) -> int:
    """Check the config and data, then train (SFT, or dpo/orpo); returns 0.

    Raises:
        ConfigError, DataError: bad input (exit 64, 65), before anything is written.
        StopRequested: stopped on purpose after a checkpoint (exit 75), once the process
            group is closed.
    """
    from llmtrain.model.device import this_machine
    from llmtrain.train import preference
    from llmtrain.train.checks import run_checks
    from llmtrain.train.run import close_process_group, train

    cfg = load_config(args.config, args.overrides)
    world = World.from_env()
    # validate's check list, for this machine, before anything is written or loaded; the data
    # is read by the main rank only (the others wait for its prepared data anyway).
    # train() then plans the run for this world and checks it, also before anything is written.
    report = run_checks(cfg, target=this_machine(), trains_here=True, data=world.is_main)
    for warning in report.warnings:
        log.warning("%s", warning)
    stopped: str | None = None
    try:
        # dpo and orpo: the same build -> train -> save around a pair loss (train/preference.py)
        (preference.train if cfg.method.name in PREFERENCE_METHODS else train)(cfg, world)
    except StopRequested as exc:
        # Keep the message only: the traceback's frames hold the Trainer, whose (FSDP or DDP)
        # model holds the process group, which must be gone before the interpreter exits.
        stopped = str(exc)
    finally:
        close_process_group()
    if stopped is not None:
        raise StopRequested(stopped)
    return 0
