"""Batched generation with left padding, shared by `generate` and finetune's samples."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import GenerationSection


def generation_params(gen: GenerationSection) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample}
    if gen.do_sample:
        params.update(temperature=gen.temperature, top_p=gen.top_p)
    return params


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[str], gen: GenerationSection) -> list[str]:
    """Answers for prompts, in order; the prompt is not repeated in the answer."""
    tokenizer.padding_side = "left"  # decoder-only models continue from the last position
    params = generation_params(gen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(prompts), gen.batch_size):
        batch = tokenizer(
            prompts[start : start + gen.batch_size], return_tensors="pt", padding=True
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, **params, pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1] :]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    model.train(was_training)
    return outputs


def write_jsonl(
    path: Path,
    prompts: list[str],
    outputs: list[str],
    gen: GenerationSection,
    references: Iterable[str | None] | None = None,
) -> None:
    params = generation_params(gen)
    refs = list(references) if references is not None else [None] * len(prompts)
    with path.open("w") as f:
        for prompt, output, ref in zip(prompts, outputs, refs, strict=True):
            record = {"prompt": prompt, "output": output, "params": params}
            if ref is not None:
                record["reference"] = ref
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
