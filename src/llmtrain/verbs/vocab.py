"""`llmtrain vocab`: train, extend, initialise and compare tokenizers for a new language."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from llmtrain.errors import ConfigError
from llmtrain.vocab.kinds import BYTE_LEVEL, SENTENCEPIECE

log = logging.getLogger(__name__)

EXAMPLE = (
    "llmtrain vocab train --like /models/Mistral-7B --text ru.txt --vocab-size 32000 --out tok-ru\n"
    "  llmtrain vocab extend /models/Mistral-7B tok-ru --out tok-ext\n"
    "  llmtrain vocab init /models/Mistral-7B tok-ext --out mistral-ru-init\n"
    "  llmtrain vocab stats --text ru-test.txt /models/Mistral-7B tok-ext"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="vocab_command", metavar="COMMAND", required=True)

    train = sub.add_parser("train", help="train a tokenizer on text files")
    train.add_argument(
        "--text", type=Path, action="append", required=True, help="UTF-8 text file (repeatable)"
    )
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", type=Path, required=True, help="tokenizer directory to write")
    train.add_argument(
        "--like",
        help="base model or tokenizer directory: its style, special tokens and chat template",
    )
    train.add_argument(
        "--kind",
        choices=(SENTENCEPIECE, BYTE_LEVEL),
        help="tokenizer style without --like (default sentencepiece); with --like, its style",
    )
    train.add_argument(
        "--model",
        choices=("bpe", "unigram"),
        default="bpe",
        help="SentencePiece algorithm (byte-level is always BPE)",
    )
    train.add_argument(
        "--character-coverage",
        type=float,
        default=0.9999,
        help="SentencePiece: share of characters kept as symbols; rarer ones fall back to bytes",
    )

    extend = sub.add_parser("extend", help="append a new tokenizer's missing tokens to a base's")
    extend.add_argument("base", help="base model or tokenizer directory")
    extend.add_argument("new", help="tokenizer directory from `vocab train --like BASE`")
    extend.add_argument("--out", type=Path, required=True)

    init = sub.add_parser("init", help="resize a model to a new vocabulary (subtoken-mean init)")
    init.add_argument("model", type=Path, help="model directory (with its tokenizer)")
    init.add_argument("tokenizer", type=Path, help="the new tokenizer directory")
    init.add_argument("--out", type=Path, required=True, help="model directory to write")
    init.add_argument("--pad-to-multiple-of", type=int, help="round the embedding rows up")

    stats = sub.add_parser("stats", help="characters per token and tokens per word, side by side")
    stats.add_argument("--text", type=Path, required=True, help="UTF-8 text file")
    stats.add_argument("tokenizers", nargs="+", help="model or tokenizer directories")


def _train(args: argparse.Namespace) -> None:
    from llmtrain.vocab.build import (
        load_tokenizer,
        tokenizer_kind,
        train_byte_level,
        train_sentencepiece,
    )

    if args.vocab_size < 1:
        raise ConfigError(f"--vocab-size {args.vocab_size} is not positive", "pass e.g. 32000")
    like = load_tokenizer(args.like) if args.like else None
    kind = tokenizer_kind(like) if like else args.kind or SENTENCEPIECE
    if like and args.kind and args.kind != kind:
        raise ConfigError(
            f"--kind {args.kind} but the base {args.like} is {kind} style",
            "drop --kind: a tokenizer for this base must be of the base's style",
        )
    if kind == BYTE_LEVEL:
        if args.model != "bpe":
            raise ConfigError(f"--model {args.model} with a byte-level tokenizer", "drop --model")
        tok = train_byte_level(args.text, args.vocab_size, args.out, like=like)
    else:
        tok = train_sentencepiece(
            args.text,
            args.vocab_size,
            args.out,
            model_type=args.model,
            like=like,
            character_coverage=args.character_coverage,
        )
    log.info("trained a %s tokenizer of %d tokens in %s", kind, len(tok), args.out)


def _extend(args: argparse.Namespace) -> None:
    from llmtrain.vocab.build import extend_tokenizer, load_tokenizer

    ext, appended = extend_tokenizer(load_tokenizer(args.base), load_tokenizer(args.new), args.out)
    log.info("appended %d tokens; %d tokens in %s", len(appended), len(ext), args.out)


def _init(args: argparse.Namespace) -> None:
    from llmtrain.vocab.resize import init_model_dir

    if args.pad_to_multiple_of is not None and args.pad_to_multiple_of < 1:
        raise ConfigError("--pad-to-multiple-of must be positive", "pass e.g. 64")
    vmap = init_model_dir(args.model, args.tokenizer, args.out, args.pad_to_multiple_of)
    log.info("wrote %s: %s", args.out, vmap.summary())


def _stats(args: argparse.Namespace) -> None:
    from llmtrain.vocab.build import load_tokenizer
    from llmtrain.vocab.stats import format_table, measure, read_lines

    lines = read_lines(args.text)
    print(format_table([measure(load_tokenizer(t), lines, t) for t in args.tokenizers]))


def run(args: argparse.Namespace) -> int:
    {"train": _train, "extend": _extend, "init": _init, "stats": _stats}[args.vocab_command](args)
    return 0
