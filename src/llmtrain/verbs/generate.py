"""`llmtrain generate`: answers for prompts rendered from a dataset, or from a prompts file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmtrain.config import GenerationSection, ModelSection, load_config
from llmtrain.errors import ConfigError, DataError

EXAMPLE = (
    "llmtrain generate configs/lora.yaml --adapter runs/lora/final/adapter "
    "--out runs/lora/answers.jsonl"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config: model, data template, generation settings")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: key.sub=value")
    parser.add_argument("--adapter", type=Path, help="LoRA adapter directory on top of model.path")
    parser.add_argument("--model", help="a merged or fully fine-tuned model directory instead")
    parser.add_argument(
        "--prompts", type=Path, help="JSONL with a 'prompt' field, or text with one prompt per line"
    )
    parser.add_argument("--limit", type=int, default=None, help="at most N prompts")
    parser.add_argument(
        "--all-rows",
        action="store_true",
        help="answer every row of data.path, not only the held-out rows the run prepared",
    )
    parser.add_argument("--out", type=Path, required=True, help="output JSONL")


def read_prompts(path: Path) -> list[str]:
    """Prompts from a .jsonl file (one {"prompt": ...} object per line) or a text file (one prompt
    per non-empty line).

    Raises:
        ConfigError: the file does not exist (exit 64).
        DataError: a JSONL line is not an object with a 'prompt' field (exit 65)."""
    if not path.is_file():
        raise ConfigError(f"--prompts {path} does not exist", "pass a JSONL or text file")
    if path.suffix != ".jsonl":
        return [line for line in path.read_text().splitlines() if line.strip()]
    prompts = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append(str(json.loads(line)["prompt"]))
        except (ValueError, KeyError, TypeError):
            raise DataError(
                f"{path}: line {lineno} is not an object with a 'prompt' field",
                'write one {"prompt": "..."} per line',
            ) from None
    return prompts


def _tokenizer_source(cfg_model: ModelSection, args: argparse.Namespace) -> ModelSection:
    """Where the tokenizer (and its chat template) comes from: the adapter's directory when it
    saved one, else --model, else model.path."""
    if args.adapter is not None and (args.adapter / "tokenizer_config.json").is_file():
        return cfg_model.model_copy(update={"tokenizer": str(args.adapter)})
    if args.model:
        return cfg_model.model_copy(update={"path": args.model, "tokenizer": None})
    return cfg_model


def run(args: argparse.Namespace) -> int:
    """Generate an answer to each prompt with the trained model and write them as JSONL.

    Raises:
        ConfigError: --model and --adapter are both given; neither --prompts nor --all-rows is
            given and output.dir holds no held-out rows; or the config, model or adapter cannot
            be loaded (exit 64).
        DataError: a prompt file line is malformed (exit 65)."""
    from llmtrain.data import prompts
    from llmtrain.model.export import load_for_inference
    from llmtrain.model.generation import generate, write_jsonl
    from llmtrain.model.load import load_tokenizer

    cfg = load_config(args.config, args.overrides)
    if args.model and args.adapter:
        raise ConfigError(
            "--model and --adapter exclude each other",
            "give a merged model with --model, or an adapter for model.path",
        )
    if not args.prompts:  # the rows to answer, decided before a tokenizer or model loads
        if args.all_rows:
            sources, where = prompts.all_rows(cfg), "all rows of the data"
        else:
            kept = prompts.held_out(cfg)
            if kept is None:  # answers to training rows would read as a score on unseen ones
                raise ConfigError(
                    f"{cfg.prepared_dir()} holds no held-out rows: output.dir is not the "
                    "directory of a run that kept some (data.eval_fraction)",
                    "set output.dir to the run's directory, give --prompts FILE, or pass "
                    "--all-rows to answer every row, training rows included",
                )
            sources, where = kept, f"the held-out rows in {cfg.prepared_dir()}"
    tokenizer = load_tokenizer(_tokenizer_source(cfg.model, args))
    if args.prompts:
        if cfg.data.shape != "chat" and cfg.data.prompt_template:
            # A newcomer's "What is 3 plus 4?" read as a whole prompt, unlike the training rows.
            print(
                f"prompts: {args.prompts}, each the whole text the model reads "
                f"(data.prompt_template {cfg.data.prompt_template!r} is not applied; for rows "
                "rendered through it: data.path=FILE --all-rows)",
                file=sys.stderr,
            )
        asked = prompts.from_texts(read_prompts(args.prompts), cfg, tokenizer)
    else:
        print(f"prompts: {where}", file=sys.stderr)
        asked = prompts.from_sources(sources, tokenizer, args.limit)
    if args.limit:
        asked = prompts.Prompts(
            asked.prompts[: args.limit],
            asked.references[: args.limit] if asked.references else None,
            asked.conversations[: args.limit] if asked.conversations else None,
        )
    base = cfg.model
    if args.model:
        base = base.model_copy(update={"path": args.model, "tokenizer": None})
    gen: GenerationSection = cfg.generation
    model, tokenizer = load_for_inference(
        base,
        args.adapter,
        device_map=gen.device_map,
        quantized=args.adapter is not None and cfg.method.name == "qlora",
    )
    outputs = generate(model, tokenizer, asked.prompts, gen)
    write_jsonl(args.out, asked.prompts, outputs, gen, asked.references, asked.conversations)
    print(f"{len(outputs)} answer{'' if len(outputs) == 1 else 's'} written to {args.out}")
    return 0
