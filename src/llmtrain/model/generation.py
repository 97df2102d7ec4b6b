"""Batched generation with left padding, shared by `generate` and finetune's samples."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from llmtrain.config import GenerationSection
from llmtrain.vocab.special_tokens import SpecialTokens, decide, stop_ids


def generation_params(gen: GenerationSection) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample}
    if gen.do_sample:
        params.update(temperature=gen.temperature, top_p=gen.top_p)
    return params


def prompt_batch(tokenizer: Any, special: SpecialTokens, prompts: list[str]) -> Any:
    """Prompts encoded as training encoded them: one BOS where the model takes one, no EOS
    (a tokenizer with add_eos_token would end the prompt), padded on the left.

    Returns: input_ids and attention_mask, [len(prompts), longest] int64 tensors."""
    ids = tokenizer(prompts, add_special_tokens=False).input_ids
    if special.bos_id is not None:
        ids = [x if x[:1] == [special.bos_id] else [special.bos_id, *x] for x in ids]
    return tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[str], gen: GenerationSection) -> list[str]:
    """Answers for prompts, in order; the prompt is not repeated in the answer."""
    tokenizer.padding_side = "left"  # decoder-only models continue from the last position
    special = decide(tokenizer)
    params = generation_params(gen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(prompts), gen.batch_size):
        batch = prompt_batch(tokenizer, special, prompts[start : start + gen.batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            **params,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids(model.generation_config, tokenizer),
        )
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
    conversations: Sequence[list[dict[str, str]] | None] | None = None,
    before: Sequence[str] | None = None,
) -> None:
    """One JSON object per prompt: prompt, output, params, and the reference when known; for
    chat runs also `messages`, the conversation with the reply as its last turn; `before`, the
    base model's answer, when given (finetune's samples)."""
    params = generation_params(gen)
    refs = list(references) if references is not None else [None] * len(prompts)
    convs: list[list[dict[str, str]] | None] = (
        list(conversations) if conversations is not None else [None] * len(prompts)
    )
    befores: list[str | None] = list(before) if before is not None else [None] * len(prompts)
    with path.open("w") as f:
        for prompt, output, ref, conv, was in zip(
            prompts, outputs, refs, convs, befores, strict=True
        ):
            record: dict[str, Any] = {"prompt": prompt, "output": output, "params": params}
            if ref is not None:
                record["reference"] = ref
            if was is not None:
                record["before"] = was
            if conv is not None:
                record["messages"] = [*conv, {"role": "assistant", "content": output}]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
