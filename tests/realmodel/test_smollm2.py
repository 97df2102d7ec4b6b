"""A real pretrained instruct model, SmolLM2-135M-Instruct (Llama, byte-level BPE, ChatML), end
to end: the conversion's fidelity, then a LoRA chat fine-tune through the real CLI on
multi-turn conversations with system prompts, teaching a format the base model does not use."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtrain.config import ModelSection, load_config
from tests.conftest import run_cli

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

# The conversion's fidelity, measured with torch 2.13 on 2 cores: the converted model in
# transformers 4.37.2 against the GGUF's dequantized weights read by transformers' own GGUF
# reader (5.x), float32, a 57-token ChatML prompt: max |logit diff| 0.0, top-1 agreement 1.0.
# By hand, rope_theta left at 4.37.2's default gave 7.4 (top-1 0.96); Q/K left in llama.cpp's
# permuted order gave 34.5 (top-1 0.51).
MAX_ABS_DIFF = 1e-3
IM_END = "<|im_end|>"

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("light", "dark"),
    ("early", "late"), ("full", "empty"), ("happy", "sad"), ("open", "closed"),
    ("strong", "weak"), ("rich", "poor"), ("wet", "dry"), ("loud", "quiet"), ("hard", "soft"),
    ("young", "old"), ("high", "low"), ("thick", "thin"), ("long", "short"), ("clean", "dirty"),
    ("near", "far"), ("heavy", "light"), ("inside", "outside"), ("first", "last"),
    ("win", "lose"), ("day", "night"), ("push", "pull"), ("buy", "sell"), ("left", "right"),
]
SYSTEMS = ["You answer with the opposite word.", "Reply with the antonym only.",
           "You are a dictionary of opposites."]


def conversations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Multi-turn rows with a system prompt: each answer is `ANSWER: <opposite>`, a format the
    base model does not produce by itself."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        (a, b), (c, d) = rng.sample(OPPOSITES, 2)
        rows.append({"messages": [
            {"role": "system", "content": rng.choice(SYSTEMS)},
            {"role": "user", "content": f"What is the opposite of {a}?"},
            {"role": "assistant", "content": f"ANSWER: {b}"},
            {"role": "user", "content": f"And the opposite of {c}?"},
            {"role": "assistant", "content": f"ANSWER: {d}"},
        ]})
    return rows


def chat_args(model: Path, data: Path, out: Path) -> list[str]:
    """A run kept short for 2 CPU cores: ~50-token conversations, 10 steps of 8 (measured: the
    loss falls from 2.8 to 0.06 in 5 steps, to 0.002 by step 12)."""
    return [
        "configs/chat.yaml", f"model.path={model}", "model.dtype=float32",
        f"data.path={data}", "data.chat_template=auto", "data.max_length=96",
        "data.packing=none", "data.eval_fraction=0.1", f"output.dir={out}",
        "output.merge=true", "training.per_device_train_batch_size=8",
        "training.gradient_accumulation_steps=1", "training.learning_rate=2e-3",
        "training.warmup_ratio=0", "training.max_steps=10", "training.save_steps=10",
        "training.eval_steps=10", "training.logging_steps=2", "training.report_to=[none]",
        "generation.samples=4", "generation.max_new_tokens=16",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smollm2-data") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conversations(160)))
    return path


@pytest.fixture(scope="module")
def run(smollm2: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2-run") / "out"
    result = run_cli("finetune", *chat_args(smollm2, data, out), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def load(path: Path, **overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32,
                                                 **overrides)
    return model.eval()


def test_conversion_matches_the_gguf_weights(smollm2: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(smollm2 / "reference.safetensors"), "pt") as f:
        ids, reference = f.get_tensor("input_ids")[None], f.get_tensor("logits")
    model = load(smollm2)
    assert model.config.rope_theta == 100000.0  # read by 4.37.2, not its default
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    diff = (logits - reference).abs().max().item()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    assert diff <= MAX_ABS_DIFF and top1 == 1.0, (diff, top1)
    # The bound tells a wrong conversion apart: the default rope_theta moves the logits by units.
    with torch.no_grad():
        wrong = load(smollm2, rope_theta=10000.0)(input_ids=ids).logits[0]
    assert (wrong - reference).abs().max().item() > 100 * MAX_ABS_DIFF


def test_tokenizer_is_fast_with_chatml_and_im_end(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    assert tok.is_fast and tok.eos_token == IM_END
    assert tok("<|im_start|>user\n12 cats<|im_end|>", add_special_tokens=False).input_ids == [
        1, 4093, 198, 33, 34, 7680, 2]  # specials whole, digits one by one (SmolLM2's rule)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    sample = "Wörter, 3.14 and  spaces\n\ttabs ✓"
    assert tok.decode(tok(sample, add_special_tokens=False).input_ids) == sample


def test_labels_cover_exactly_the_assistant_turns_and_im_end(smollm2: Path, data: Path) -> None:
    from llmtrain.data.rows import load_rows
    from llmtrain.data.tokenize import tokenize
    from llmtrain.model.load import load_tokenizer

    cfg = load_config("configs/chat.yaml", chat_args(smollm2, data, Path("unused"))[1:])
    tok = load_tokenizer(cfg.model)
    rows = load_rows(cfg.data)
    encoded, stats = tokenize(rows, tok, cfg.data)
    assert stats.kept == len(rows) == 160
    for i in range(len(rows)):
        ids, labels = encoded[i]["input_ids"], encoded[i]["labels"]
        spans: list[list[int]] = []
        for k, (t, lab) in enumerate(zip(ids, labels, strict=True)):
            if lab != -100:
                assert lab == t
                if k == 0 or labels[k - 1] == -100:
                    spans.append([])
                spans[-1].append(t)
        expected = [m["content"] + IM_END for m in rows[i]["messages"]
                    if m["role"] == "assistant"]
        assert [tok.decode(s) for s in spans] == expected


def test_lora_run_learns_and_merged_equals_adapter(run: Path, smollm2: Path) -> None:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    from llmtrain.model.export import load_for_inference

    base = ModelSection(path=str(smollm2), dtype="float32")
    adapter_model, tok = load_for_inference(base, run / "final" / "adapter")
    merged_model, _ = load_for_inference(base.model_copy(update={"path": str(run / "final" /
                                                                              "merged")}), None)
    batch = tok(["<|im_start|>user\nWhat is the opposite of hot?<|im_end|>\n"
                 "<|im_start|>assistant\n"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        adapter = adapter_model(**batch).logits
        merged = merged_model(**batch).logits
        untrained = load(smollm2)(**batch).logits
    assert torch.allclose(adapter, merged, atol=1e-4), (adapter - merged).abs().max()
    assert (adapter - untrained).abs().max() > 1e-2  # the adapter changed the model


def answer(model: Any, tok: Any, messages: list[dict[str, str]], limit: int = 24) -> list[int]:
    """Greedy reply ids through the saved chat template, stopping at the generation config's
    EOS as `generate` does."""
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=limit, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    return list(out[0, ids.shape[1]:].tolist())


def test_reply_follows_the_trained_format_and_stops_at_im_end(run: Path, smollm2: Path) -> None:
    from transformers import AutoTokenizer

    merged = run / "final" / "merged"
    tok = AutoTokenizer.from_pretrained(str(merged))
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == im_end
    messages = [{"role": "system", "content": SYSTEMS[0]},
                {"role": "user", "content": "What is the opposite of good?"}]
    base_reply = tok.decode(answer(load(smollm2), tok, messages), skip_special_tokens=True)
    assert not base_reply.startswith("ANSWER:"), base_reply  # the format is learnt, not innate
    reply = answer(load(merged), tok, messages)
    assert reply[-1] == im_end and len(reply) < 24, tok.decode(reply)
    assert re.fullmatch(r"ANSWER: [a-z]+", tok.decode(reply[:-1])), tok.decode(reply)
    # finetune's own samples: held-out conversations answered through the saved template.
    samples = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    for s in samples:
        assert s["prompt"].endswith("<|im_start|>assistant\n")
        assert re.fullmatch(r"ANSWER: [a-z]+", s["output"]), s
