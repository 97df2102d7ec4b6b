"""The benchmark's models, workloads and synthetic data, all built here (nothing downloaded).

Fixed-length rows are uniform random token ids, every token with loss. Variable-length rows are
instruction samples whose lengths follow LENGTH_DISTRIBUTION: a prompt without loss followed by
a response with loss, as llmtrain's instruction data is tokenized.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from llmtrain.config import resolve_path
from llmtrain.labels import IGNORE_INDEX

# Published shapes, random weights.
MODELS: dict[str, dict[str, int]] = {
    "1b": {  # TinyLlama-1.1B
        "num_hidden_layers": 22, "hidden_size": 2048, "intermediate_size": 5632,
        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
    },
    "7b": {  # Llama-2-7B
        "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    },
    "tiny": {  # --smoke on a CPU
        "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 176,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    },
}  # fmt: skip

MEDIAN, SIGMA, MIN_LEN, CAP = 300, 0.8, 16, 4096
PROMPT_SHARE = (0.2, 0.7)
LENGTH_DISTRIBUTION = (
    f"log-normal lengths, median {MEDIAN} tokens, sigma {SIGMA} (mean about "
    f"{MEDIAN * math.exp(SIGMA**2 / 2):.0f}, 99th percentile about "
    f"{MEDIAN * math.exp(2.326 * SIGMA):.0f}), clipped to [{MIN_LEN}, {CAP}]; the first "
    f"U{PROMPT_SHARE} share of each sample is its prompt, without loss"
)


@dataclass(frozen=True)
class Workload:
    name: str
    model: str
    method: str  # full | lora
    batch: int  # samples per micro-batch (llmtrain: unless a token budget re-cuts the step)
    variable: bool  # instruction samples of LENGTH_DISTRIBUTION, else fixed-length rows
    seq_len: int  # the row length, or the cap of variable lengths
    median: int = MEDIAN
    learning_rate: float = 1e-5
    accumulation: int = 1  # micro-batches per optimizer step, both sides

    @property
    def step_samples(self) -> int:
        """Samples per optimizer step, the same for the baseline and every llmtrain run."""
        return self.batch * self.accumulation

    @property
    def describe(self) -> str:
        lengths = "variable-length instruction" if self.variable else f"fixed {self.seq_len}"
        accumulated = f" x {self.accumulation} accumulated" if self.accumulation > 1 else ""
        return f"{self.model} {self.method}, {lengths}, batch {self.batch}{accumulated}"


WORKLOADS = {
    w.name: w
    for w in (
        Workload("fixed-1b-full", "1b", "full", 8, False, 2048),
        Workload("fixed-7b-lora", "7b", "lora", 4, False, 2048, learning_rate=2e-4),
        Workload("var-1b-full", "1b", "full", 8, True, CAP),
        Workload("var-7b-lora", "7b", "lora", 4, True, CAP, learning_rate=2e-4),
    )
}
SMOKE = {
    w.name: w
    for w in (
        Workload("fixed-tiny-full", "tiny", "full", 4, False, 64),
        Workload("fixed-tiny-lora", "tiny", "lora", 4, False, 64, learning_rate=2e-4),
        Workload("var-tiny-full", "tiny", "full", 4, True, 64, median=20),
    )
}


def sample_lengths(n: int, median: int, cap: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    logs = math.log(median) + SIGMA * torch.randn(n, generator=g, dtype=torch.float64)
    return logs.exp().round().clamp(MIN_LEN, cap).long().tolist()


def build_rows(work: Workload, n: int, seed: int) -> datasets.Dataset:
    """n tokenized rows {input_ids, labels}, as llmtrain's prepared data holds them."""
    vocab = MODELS[work.model]["vocab_size"]
    g = torch.Generator().manual_seed(seed)
    ids_list, labels_list = [], []
    lengths = (
        sample_lengths(n, work.median, work.seq_len, seed) if work.variable else [work.seq_len] * n
    )
    shares = torch.empty(n, dtype=torch.float64).uniform_(*PROMPT_SHARE, generator=g).tolist()
    for length, share in zip(lengths, shares, strict=True):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        prompt = int(length * share) if work.variable else 0
        ids_list.append(ids)
        labels_list.append([IGNORE_INDEX] * prompt + ids[prompt:])
    return datasets.Dataset.from_dict({"input_ids": ids_list, "labels": labels_list})


def build_model(name: str, root: Path) -> tuple[Path, dict[str, Any]]:
    """A random-init Llama saved in bf16 with the embedded tokenizer, made once per call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / f"llama-{name}"
    config = LlamaConfig(**MODELS[name], max_position_embeddings=CAP, torch_dtype="bfloat16")
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path, safe_serialization=True)
        del model
        tok = Path(resolve_path("embedded:tiny-llama"))
        for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(tok / f, path / f)
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter, kv = config.intermediate_size, config.num_key_value_heads
    head = h // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv * head + 3 * h * inter + 2 * h
    shape = {
        "parameters": layers * per_layer + 2 * vocab * h + h,
        "layers": layers,
        "hidden": h,
    }
    return path, shape
