"""Batching tokenized examples: pad to the batch's longest, labels padded with -100."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmtrain.labels import IGNORE_INDEX


@dataclass
class PadCollator:
    """Rows right-padded to the batch's longest, rounded up to `pad_to_multiple_of`:
    input_ids, labels (-100 on padding) and attention_mask, int64 [rows, width].

    `omit_full_mask`: a batch in which no row is padded goes without attention_mask. The
    model then attends causally, as with an all-ones mask; transformers 4.37.2 would read that
    mask on the host (`torch.all(mask == 1)`, a GPU sync in every forward) only to drop it."""

    pad_token_id: int
    pad_to_multiple_of: int = 8
    omit_full_mask: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        m = self.pad_to_multiple_of
        width = (longest + m - 1) // m * m
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            attention_mask[i, :k] = 1
        if self.omit_full_mask and all(len(f["input_ids"]) == width for f in features):
            return {"input_ids": input_ids, "labels": labels}
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
