"""`llmtrain generate`: answers for prompts rendered from a dataset, or from a prompts file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmtrain.config import GenerationSection, load_config
from llmtrain.data import load_rows
from llmtrain.errors import ConfigError, DataError
from llmtrain.export import load_for_inference
from llmtrain.generation import generate, write_jsonl
from llmtrain.templates import TemplateError, render

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
    parser.add_argument("--out", type=Path, required=True, help="output JSONL")


def read_prompts(path: Path) -> list[str]:
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


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    refs: list[str | None] | None = None
    if args.prompts:
        prompts = read_prompts(args.prompts)
    else:
        rows = load_rows(cfg.data)
        if cfg.data.prompt_template is None:
            raise ConfigError(
                "generate needs data.prompt_template or --prompts",
                "set data.prompt_template or pass --prompts FILE",
            )
        try:
            prompts = [render(cfg.data.prompt_template, r) for r in rows]
            if cfg.data.response_template:
                refs = [render(cfg.data.response_template, r) for r in rows]
        except TemplateError as exc:
            raise DataError(str(exc), "fix data.prompt_template or the data") from None
    if args.limit:
        prompts = prompts[: args.limit]
        refs = refs[: args.limit] if refs else None
    if args.model and args.adapter:
        raise ConfigError(
            "--model and --adapter exclude each other",
            "give a merged model with --model, or an adapter for model.path",
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
    outputs = generate(model, tokenizer, prompts, gen)
    write_jsonl(args.out, prompts, outputs, gen, refs)
    print(f"{len(outputs)} answers written to {args.out}")
    return 0
