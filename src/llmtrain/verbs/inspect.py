"""`llmtrain inspect`: print tokenized rows with the trained and the masked tokens told apart.

Plain text, no colour, so it reads the same in a batch log or a pipe: each run of masked
tokens is shown as `[masked]...[/masked]` and each run of trained ones as
`[trained]...[/trained]`; BOS, EOS and other special tokens appear as themselves. Rows come
from the same tokenize() that `prepare` and `finetune` use; nothing is written.
"""

from __future__ import annotations

import argparse
from typing import Any

from llmtrain.config import load_config
from llmtrain.labels import IGNORE_INDEX

EXAMPLE = "llmtrain inspect configs/lora.yaml --rows 3"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: key.sub=value")
    parser.add_argument("--rows", type=int, default=3, help="how many rows to show")
    parser.add_argument("--start", type=int, default=0, help="first row to show (0-based)")
    parser.add_argument(
        "--pieces", action="store_true", help="also list the token pieces, trained ones in *...*"
    )


def _visible(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def runs(labels: list[int]) -> list[tuple[int, int, bool]]:
    """Maximal runs [start, end) of positions that are all trained or all masked."""
    out: list[tuple[int, int, bool]] = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            out.append((start, i, labels[start] != IGNORE_INDEX))
            start = i
    return out


def show(ids: list[int], labels: list[int], tokenizer: Any) -> str:
    """One row as `[masked]..[/masked][trained]..[/trained]` spans of decoded text.

    Each span's text is the decoded prefix up to its end minus the decoded prefix up to its
    start, so the spaces SentencePiece attaches to a piece stay where they are."""

    def decode(k: int) -> str:
        return str(
            tokenizer.decode(
                ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        )

    parts = []
    for start, end, trained in runs(labels):
        before, upto = decode(start), decode(end)
        text = upto[len(before) :] if upto.startswith(before) else decode(end)[len(before) :]
        tag = "trained" if trained else "masked"
        parts.append(f"[{tag}]{_visible(text)}[/{tag}]")
    return "".join(parts)


def run(args: argparse.Namespace) -> int:
    from llmtrain.data.rows import check_templates, load_rows
    from llmtrain.data.tokenize import tokenize
    from llmtrain.train.checks import check_model

    cfg = load_config(args.config, args.overrides)
    _, tokenizer, _ = check_model(cfg)
    print(
        f"special tokens: BOS {tokenizer.bos_token!r}, EOS {tokenizer.eos_token!r}, "
        f"padding {tokenizer.pad_token!r}"
    )
    sections = cfg.data.for_sources()
    for index, section in enumerate(sections):
        rows = load_rows(section)
        check_templates(section, rows)
        first, last = min(args.start, len(rows)), min(args.start + args.rows, len(rows))
        ds, stats = tokenize(rows.select(range(first, last)), tokenizer, section)
        print(f"{f'source {index} ({section.path}) ' if len(sections) > 1 else ''}data: "
              f"{stats.summary()}")
        for k, (ids, labels) in enumerate(zip(ds["input_ids"], ds["labels"], strict=True)):
            trained = sum(1 for t in labels if t != IGNORE_INDEX)
            print(f"\nrow {first + k}: {len(ids)} tokens, {trained} trained")
            print(show(ids, labels, tokenizer))
            if args.pieces:
                pieces = tokenizer.convert_ids_to_tokens(ids)
                print(" ".join(f"*{p}*" if lab != IGNORE_INDEX else p
                               for p, lab in zip(pieces, labels, strict=True)))
    return 0
