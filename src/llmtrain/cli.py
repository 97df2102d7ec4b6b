"""The `llmtrain` command: one module per verb, each with `add_arguments` and `run`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import select
import signal
import sys
from collections.abc import Sequence
from typing import Protocol

from llmtrain.errors import EXIT_STOPPED, EXIT_USAGE, LlmtrainError, StopRequested

# verb -> (module, one-line help). Modules are imported only when their verb runs, so
# `llmtrain --help` and `llmtrain validate` stay fast on a login node.
VERBS: dict[str, tuple[str, str]] = {
    "validate": (
        "llmtrain.verbs.validate",
        "check a run config, its paths and data (CPU, no weights)",
    ),
    "prepare": ("llmtrain.verbs.prepare", "tokenize the dataset once and save it for finetune"),
    "inspect": ("llmtrain.verbs.inspect", "show tokenized rows: which tokens are trained"),
    "finetune": ("llmtrain.verbs.finetune", "train: full, layers, LoRA, QLoRA, DPO or ORPO"),
    "generate": ("llmtrain.verbs.generate", "generate answers for prompts from a dataset or file"),
    "merge": ("llmtrain.verbs.merge", "merge a LoRA adapter into its base model"),
    "env": ("llmtrain.verbs.env", "print the provenance manifest of this environment"),
    "estimate": ("llmtrain.verbs.estimate", "predict memory per GPU and compute for a run config"),
    "doctor": ("llmtrain.verbs.doctor", "preflight an allocation: GPUs, NCCL bandwidth, caches"),
    "vocab": ("llmtrain.verbs.vocab", "train, extend, initialise and compare tokenizers"),
    "lep": ("llmtrain.verbs.lep", "carry adapted embeddings to an instruct model (LEP)"),
}


class Verb(Protocol):
    EXAMPLE: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _load(verb: str) -> Verb:
    module: Verb = importlib.import_module(VERBS[verb][0])
    return module


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llmtrain")
    except metadata.PackageNotFoundError:  # run from a source tree (PYTHONPATH=src)
        return "unknown (not installed)"


def build_parser(
    verb: str | None,
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The top-level parser, and the parser of `verb` with its arguments (None: no verb)."""
    verb_parser = None
    parser = argparse.ArgumentParser(
        prog="llmtrain", description="Reproducible LLM fine-tuning on clusters."
    )
    parser.add_argument("--version", action="version", version=f"llmtrain {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (_, help_text) in VERBS.items():
        if name != verb:
            sub.add_parser(name, help=help_text)
            continue
        module = _load(name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {module.EXAMPLE}\n",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        verb_parser = p
    return parser, verb_parser


def _parse(
    parser: argparse.ArgumentParser, verb_parser: argparse.ArgumentParser | None, argv: list[str]
) -> argparse.Namespace:
    """Overrides and options in any order (`CONFIG --gpu h100 key=v`) for `llmtrain VERB ...`:
    the verb's own parser reads the rest intermixed, and a usage error shows the verb's usage.
    Anything else (`--help`, no verb, an unknown verb) goes to the top-level parser."""
    if verb_parser is None or not argv or argv[0] not in VERBS:
        return parser.parse_args(argv)
    try:
        args = verb_parser.parse_intermixed_args(argv[1:])
    except TypeError:  # a verb with its own sub-commands (vocab): argparse cannot intermix
        args = verb_parser.parse_args(argv[1:])
    args.verb = argv[0]
    return args


def _stdout_has_no_reader() -> bool:
    """True when stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _quiet_exit_on_closed_stdout() -> int:
    """The reader of stdout went away (`llmtrain env | head -1`): exit quietly, as a tool
    killed by SIGPIPE would (128 + SIGPIPE = 141), without a traceback."""
    # Python flushes stdout again at exit; pointing it at /dev/null keeps that flush quiet.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser, verb_parser = build_parser(verb if verb in VERBS else None)
    try:
        args = _parse(parser, verb_parser, argv)
    except SystemExit as exit_:
        # argparse exits 2 on bad usage; the contract says 64 (never requeue).
        return EXIT_USAGE if exit_.code == 2 else int(exit_.code or 0)
    if args.verb is None:
        # No verb is a usage error (a job script that lost its arguments must not pass).
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    # Our loggers at INFO, every other library's at WARNING: with the root at INFO, libraries'
    # import-time notes (datasets' "PyTorch version ... available.") reached every verb's output.
    logging.basicConfig(level=logging.WARNING, format="[llmtrain] %(message)s", stream=sys.stderr)
    logging.getLogger("llmtrain").setLevel(logging.INFO)
    if not sys.stderr.isatty():
        import datasets

        datasets.disable_progress_bars()
    try:
        code = _load(args.verb).run(args)
        sys.stdout.flush()  # here, so that a closed pipe is seen below and not at exit
        return code
    except BrokenPipeError:
        if not _stdout_has_no_reader():
            raise  # another pipe broke (a worker, a socket): a real failure
        return _quiet_exit_on_closed_stdout()
    except LlmtrainError as err:
        print(f"llmtrain {args.verb}: error: {err.message()}", file=sys.stderr)
        return err.exit_code
    except StopRequested as stop:
        print(f"llmtrain {args.verb}: stopped early ({stop}); resubmit to resume", file=sys.stderr)
        return EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(main())
