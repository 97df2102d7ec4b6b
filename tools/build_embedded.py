"""Rebuild the embedded default shipped in src/llmtrain/embedded/ (run: make embedded).

It writes, deterministically from this file alone:
  corpus.txt     plain English text about small numbers, half of it one-digit sums and
                 differences (the tokenizer's and base model's text)
  arith.jsonl    the fine-tuning task: one-digit addition and subtraction questions
  tiny-llama/    a 4-layer Llama with a 512-piece SentencePiece tokenizer trained on corpus.txt,
                 pre-trained on corpus.txt so that LoRA has a language model to adapt, one
                 that already knows the sums and differences the task asks for
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

OUT = Path(__file__).resolve().parents[1] / "src" / "llmtrain" / "embedded"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
THINGS = ["apples", "birds", "boats", "books", "cats", "coins", "cups", "keys", "stars", "trees"]


def corpus_lines(rng: random.Random) -> list[str]:
    lines = []
    for _ in range(6000):
        a, b = rng.randrange(10), rng.randrange(10)
        thing = rng.choice(THINGS)
        # Half the lines state a sum or difference, so the base model knows every fact of the
        # fine-tuning task, phrased otherwise: LoRA teaches the question format, and held-out
        # questions are answerable from what pre-training stored.
        if rng.random() < 0.5:
            hi, lo = max(a, b), min(a, b)
            lines.append(
                rng.choice(
                    [
                        f"{a} plus {b} is {a + b}.",
                        f"Adding {b} to {a} gives {a + b}.",
                        f"{hi} minus {lo} is {hi - lo}.",
                        f"Taking {lo} from {hi} leaves {hi - lo}.",
                    ]
                )
            )
            continue
        lines.append(
            rng.choice(
                [
                    f"There are {a} {thing} on the table and {b} more in the box.",
                    f"The number {a} is written as {WORDS[a]}.",
                    f"She counted {WORDS[a]} {thing}, then {WORDS[b]} {thing}.",
                    f"Question: how many {thing} are there? Answer: {a} {thing}.",
                    f"If you have {a} {thing} and get {b} more, you hold a number of {thing}.",
                    f"{WORDS[a].capitalize()} comes before {WORDS[(a + 1) % 10]} when counting.",
                ]
            )
        )
    return lines


def arith_rows(rng: random.Random) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for a in range(10):
        for b in range(10):
            rows.append({"question": f"What is {a} plus {b}?", "answer": str(a + b),
                         "meta": {"op": "plus", "a": a, "b": b}})
            if a >= b:
                rows.append({"question": f"What is {a} minus {b}?", "answer": str(a - b),
                             "meta": {"op": "minus", "a": a, "b": b}})
    rng.shuffle(rows)
    return rows


def train_tokenizer(corpus: Path, model_dir: Path) -> LlamaTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "sp"
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(prefix), vocab_size=512, model_type="bpe",
            byte_fallback=True, split_digits=True, character_coverage=1.0,
            bos_id=1, eos_id=2, unk_id=0, pad_id=-1, num_threads=1, minloglevel=2,
            input_sentence_size=0, shuffle_input_sentence=False,
        )
        tok = LlamaTokenizer(vocab_file=str(prefix) + ".model", legacy=False)
        tok.save_pretrained(model_dir)
    return LlamaTokenizer.from_pretrained(model_dir)


def pretrain(tok: LlamaTokenizer, lines: list[str], model_dir: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    ids = [i for line in lines for i in [*tok(line).input_ids, tok.eos_token_id]]
    block = 64
    data = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = 800
    # Decaying the rate is what stores the sums: 400 steps at a constant rate left 63 of the
    # 155 facts answered, 800 decaying steps 134.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        batch = data[torch.randint(len(data), (32,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if step % 100 == 0:
            print(f"pretrain step {step} loss {loss.item():.3f}", file=sys.stderr)
    model.save_pretrained(model_dir, safe_serialization=True)


def main() -> None:
    rng = random.Random(0)
    OUT.mkdir(parents=True, exist_ok=True)
    lines = corpus_lines(rng)
    corpus = OUT / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    with (OUT / "arith.jsonl").open("w") as f:
        for row in arith_rows(rng):
            f.write(json.dumps(row) + "\n")
    model_dir = OUT / "tiny-llama"
    tok = train_tokenizer(corpus, model_dir)
    pretrain(tok, lines, model_dir)


if __name__ == "__main__":
    main()
