"""Tiny tokenizers and models for the vocabulary tests, built from shipped text.

The tokenizers are trained on tests/assets/vocab/en.txt in the two styles of the bases we adapt
(LLaMA-2/Mistral SentencePiece, LLaMA-3 byte-level BPE); the models are Mistral's and LLaMA's
architectures (MistralConfig, LlamaConfig) scaled down. Nothing is downloaded.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from llmtrain.vocab.build import load_tokenizer, tokenizer_kind
from llmtrain.vocab.resize import build_vocab_map, initialise, load_model

ASSETS = Path(__file__).parents[1] / "assets" / "vocab"
EN = ASSETS / "en.txt"
RU = ASSETS / "ru.txt"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tiny_model(tok: PreTrainedTokenizerFast, *, tied: bool, seed: int) -> PreTrainedModel:
    """Mistral's architecture for SentencePiece tokenizers, LLaMA's for byte-level ones."""
    torch.manual_seed(seed)
    config_class = MistralConfig if tokenizer_kind(tok) == "sentencepiece" else LlamaConfig
    config = config_class(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=tied,
    )
    model: PreTrainedModel = AutoModelForCausalLM.from_config(config)
    return model


def train_steps(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerFast,
    texts: list[str],
    *,
    steps: int,
    seed: int,
    lr: float = 1e-2,
    params: Iterable[torch.nn.Parameter] | None = None,
) -> None:
    """A few causal-LM steps of plain AdamW on random batches of `texts`."""
    rng = random.Random(seed)
    optim = torch.optim.AdamW(
        list(params) if params is not None else model.parameters(),
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-5,
        weight_decay=0.1,
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.train()
    for _ in range(steps):
        batch = tok(
            rng.sample(texts, 8), return_tensors="pt", padding=True, truncation=True, max_length=48
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    model.eval()


def save(model: PreTrainedModel, tok: PreTrainedTokenizerFast, path: Path) -> Path:
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def make_instruct(base_dir: Path, path: Path, *, seed: int) -> Path:
    """An "instruct" model: the base plus its own chat tokens and template, trained on chats."""
    old, tok, model = load_tokenizer(base_dir), load_tokenizer(base_dir), load_model(base_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    initialise(
        model, build_vocab_map(old, tok, old_rows=model.get_input_embeddings().num_embeddings)
    )
    text = lines(EN)
    chats = [
        tok.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in zip(text[::2], text[1::2], strict=False)
    ]
    train_steps(model, tok, chats, steps=15, seed=seed, lr=5e-3)
    return save(model, tok, path)
