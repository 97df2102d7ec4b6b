"""The whole adaptation on CPU: new tokenizer -> init -> embeddings-only steps -> LEP -> use."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from llmtrain.cli import main
from llmtrain.vocab.build import load_tokenizer
from llmtrain.vocab.resize import load_model
from llmtrain.vocab.stats import measure

from .tiny import EN, RU, lines, make_instruct

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "embeddings.yaml"


def embeddings_only_steps(init_dir: Path, run_dir: Path) -> Path:
    """A few steps of the shipped embeddings-only config; only embeddings and head change."""
    command = [
        sys.executable, "-m", "llmtrain.cli", "finetune", str(CONFIG),
        f"model.path={init_dir}", f"data.path={RU}", f"output.dir={run_dir}",
        "training.precision=auto",  # the config's bf16 is for GPUs; fp32 on this CPU
        "training.max_steps=6", "training.learning_rate=1e-2", "training.report_to=[none]",
    ]  # fmt: skip
    subprocess.run(command, check=True)
    final = run_dir / "final" / "model"
    before, after = load_model(init_dir), load_model(final)
    embeddings = {
        id(before.get_input_embeddings().weight),
        id(before.get_output_embeddings().weight),
    }
    after_params = dict(after.named_parameters())
    for name, param in before.named_parameters():
        changed = not torch.equal(param, after_params[name])
        assert changed == (id(param) in embeddings), name
    return final


@pytest.mark.parametrize(
    ("style", "tied", "extend"),
    [("sentencepiece", False, True), ("byte-level", True, False)],
    ids=["llama2-style-extended-untied", "llama3-style-replaced-tied"],
)
def test_adapt_then_propagate(
    style: str,
    tied: bool,
    extend: bool,
    request: pytest.FixtureRequest,
    base_dir: Callable[[PreTrainedTokenizerFast, bool], Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old_tok = request.getfixturevalue(
        "sp_tokenizer" if style == "sentencepiece" else "bl_tokenizer"
    )
    base = base_dir(old_tok, tied)
    instruct = make_instruct(base, tmp_path / "instruct", seed=7)

    trained = tmp_path / "tok-ru"
    assert (
        main(
            [
                "vocab",
                "train",
                "--like",
                str(base),
                "--text",
                str(RU),
                "--vocab-size",
                "1000",
                "--out",
                str(trained),
            ]
        )
        == 0
    )
    new_tok_dir = trained
    if extend:
        new_tok_dir = tmp_path / "tok-ext"
        assert main(["vocab", "extend", str(base), str(trained), "--out", str(new_tok_dir)]) == 0
    init = tmp_path / "init"
    assert main(["vocab", "init", str(base), str(new_tok_dir), "--out", str(init)]) == 0
    adapted = embeddings_only_steps(init, tmp_path / "run")
    out = tmp_path / "instruct-ru"
    assert (
        main(
            [
                "lep",
                "--base",
                str(base),
                "--adapted",
                str(adapted),
                "--instruct",
                str(instruct),
                "--mode",
                "conversion",
                "--out",
                str(out),
            ]
        )
        == 0
    )

    model, tok = load_model(out), load_tokenizer(out)
    inst_model, inst_tok = load_model(instruct), load_tokenizer(instruct)
    adapted_tok = load_tokenizer(adapted)
    # The new vocabulary, plus the instruct model's own tokens, map and template.
    ru = lines(RU)[0]
    assert tok(ru).input_ids == adapted_tok(ru).input_ids
    assert not set(tok.convert_ids_to_tokens(tok(ru).input_ids)) <= set(old_tok.get_vocab())
    assert {"<|im_start|>", "<|im_end|>"} <= set(tok.additional_special_tokens)
    assert tok.chat_template == inst_tok.chat_template
    assert tok.eos_token == inst_tok.eos_token and model.config.eos_token_id == tok.eos_token_id
    assert model.config.vocab_size == model.get_input_embeddings().num_embeddings >= len(tok)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    # The instruct model's transformer layers are untouched.
    inst_state = inst_model.state_dict()
    for name, tensor in model.state_dict().items():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(tensor, inst_state[name]), name
    # Its chat tokens keep the instruct model's rows.
    for t in ("<|im_start|>", "<|im_end|>"):
        assert torch.equal(
            model.get_input_embeddings().weight[tok.convert_tokens_to_ids(t)],
            inst_model.get_input_embeddings().weight[inst_tok.convert_tokens_to_ids(t)],
        )
    # It generates from a chat prompt.
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Привет! Как погода?"}],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    generated = model.generate(
        prompt, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id
    )
    assert generated.shape[1] > prompt.shape[1]
    assert int(generated.max()) < len(tok)
    # Fewer tokens for the same Russian text, through the CLI and in numbers.
    capsys.readouterr()
    assert main(["vocab", "stats", "--text", str(RU), str(base), str(out)]) == 0
    table = capsys.readouterr().out
    assert str(base) in table and str(out) in table
    text = lines(RU)
    before, after = measure(old_tok, text, "old"), measure(tok, text, "new")
    assert after.chars_per_token > 2 * before.chars_per_token
    # English still tokenizes into ids the instruct model knew when the vocabulary was extended.
    if extend:
        en = lines(EN)[0]
        assert max(tok(en).input_ids) < len(old_tok)
