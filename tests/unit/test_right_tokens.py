"""Training on exactly the right tokens: the prompt/response boundary, one BOS/EOS policy and
missing values. Tokenizers used: the embedded Llama-2-style SentencePiece (fast, and the slow
LlamaTokenizer on the same model file) and a GPT-2/Qwen-style byte-level BPE without BOS built
here from the embedded corpus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaTokenizer, PreTrainedTokenizerFast

from llmtrain.config import DataSection, ModelSection, resolve_path
from llmtrain.data.encode import trained_by_offsets, trained_by_prefixes
from llmtrain.data.rows import load_rows
from llmtrain.data.templates import render
from llmtrain.data.tokenize import tokenize
from llmtrain.errors import ConfigError, DataError
from llmtrain.labels import IGNORE_INDEX
from llmtrain.model.generation import prompt_batch
from llmtrain.model.load import load_tokenizer
from llmtrain.vocab import special_tokens

REPO = Path(__file__).resolve().parents[2]
LORA = yaml.safe_load((REPO / "configs" / "lora.yaml").read_text())


@pytest.fixture(scope="module")
def sp() -> Any:
    return load_tokenizer(ModelSection(path="embedded:tiny-llama"))


@pytest.fixture(scope="module")
def sp_slow() -> Any:
    tok = LlamaTokenizer.from_pretrained(resolve_path("embedded:tiny-llama"), legacy=False)
    special_tokens.apply_overrides(tok, ModelSection(path="embedded:tiny-llama"))
    return tok


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """GPT-2/Qwen style: byte-level BPE, no BOS, `<|endoftext|>` ends a sample."""
    corpus = resolve_path("embedded:corpus.txt")
    lines = Path(corpus).read_text().splitlines()
    lines += [f"Answer: {n} and Answer:{n}" for n in range(19)] * 20
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    out = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(
        out
    )
    return load_tokenizer(ModelSection(path=str(out)))


def arith(**kw: Any) -> DataSection:
    return DataSection(**{**LORA["data"], "eval_fraction": 0.0, **kw})


def trained_ids(ids: list[int], labels: list[int]) -> list[int]:
    return [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]


def test_embedded_rows_are_the_whole_text_tokenized_with_the_prompt_masked(sp: Any) -> None:
    cfg = arith()
    rows = load_rows(cfg)
    ds, stats = tokenize(rows, sp, cfg)
    assert stats.kept == len(rows) == 155
    for row, ids, labels in zip(rows, ds["input_ids"], ds["labels"], strict=True):
        prompt = render(cfg.prompt_template or "", row)
        text = prompt + render(cfg.response_template or "", row)
        whole = sp(text, add_special_tokens=False).input_ids
        assert ids == [sp.bos_token_id, *whole, sp.eos_token_id]
        n_prompt = len(sp(prompt, add_special_tokens=False).input_ids)
        assert whole[:n_prompt] == sp(prompt, add_special_tokens=False).input_ids
        assert labels == [IGNORE_INDEX] * (1 + n_prompt) + ids[1 + n_prompt :]
        # One "▁" for the space, then the digits (the tokenizer splits them), then EOS: the
        # old prompt/response split gave ['▁', '▁', ...] here.
        pieces = sp.convert_ids_to_tokens(trained_ids(ids, labels))
        assert pieces == ["▁", *row["answer"], "</s>"]


def test_prefix_rule_for_slow_tokenizers_masks_as_the_offsets(sp: Any, sp_slow: Any) -> None:
    cfg = arith()
    rows = load_rows(cfg)
    for row in rows:
        prompt = render(cfg.prompt_template or "", row)
        text = prompt + render(cfg.response_template or "", row)
        enc = sp(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [(len(prompt), len(text))]
        assert trained_by_prefixes(text, enc.input_ids, spans, sp) == trained_by_offsets(
            enc.offset_mapping, spans
        )
    # The slow tokenizer itself (no offsets) trains exactly the answer and EOS.
    ds, _ = tokenize(rows.select(range(40)), sp_slow, arith(limit=40))
    for row, ids, labels in zip(rows, ds["input_ids"], ds["labels"], strict=False):
        assert sp_slow.decode(trained_ids(ids, labels)) == f"{row['answer']}</s>"
        assert ids[0] == sp_slow.bos_token_id and ids.count(sp_slow.eos_token_id) == 1


def test_byte_level_bpe_boundary_and_no_bos(tmp_path: Path, bpe: Any) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "What is 7 plus 4?", "a": "11"}) + "\n")
    eos = bpe.eos_token_id
    for prompt_t, response_t in (("Q: {q}\nAnswer:", " {a}"), ("Q: {q}\nAnswer: ", "{a}")):
        cfg = DataSection(path=str(path), prompt_template=prompt_t, response_template=response_t)
        ds, _ = tokenize(load_rows(cfg), bpe, cfg)
        ids, labels = ds["input_ids"][0], ds["labels"][0]
        text = "Q: What is 7 plus 4?\nAnswer: 11"
        assert ids == [*bpe(text, add_special_tokens=False).input_ids, eos]  # no BOS
        # " 11" is one token: with the space in the prompt it straddles the boundary and is
        # trained; separate tokenization would have made it "11" after a lone " ".
        assert bpe.convert_ids_to_tokens(trained_ids(ids, labels)) == ["Ġ11", "<|endoftext|>"]


def test_eos_exactly_once_whatever_the_flags_and_templates(tmp_path: Path, sp: Any) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"q": "What is 2 plus 3?", "a": "5", "text": "one two"}) + "\n")
    adds_eos = load_tokenizer(ModelSection(path="embedded:tiny-llama"))
    adds_eos.add_eos_token = True  # some Llama tokenizers ship with it on
    assert adds_eos("a").input_ids[-1] == adds_eos.eos_token_id
    bos, eos = sp.bos_token_id, sp.eos_token_id
    cases = [
        (adds_eos, DataSection(path=str(path), prompt_template="Q: {q}", response_template=" {a}")),
        (sp, DataSection(path=str(path), prompt_template="Q: {q}", response_template=" {a}</s>")),
        (sp, DataSection(path=str(path), prompt_template="<s>Q: {q}", response_template=" {a}")),
        (adds_eos, DataSection(path=str(path), shape="text")),
        (adds_eos, DataSection(path=str(path), prompt_template="Q: {q}", response_template=" {a}",
                               packing="padding_free")),
    ]
    for tok, cfg in cases:
        ds, _ = tokenize(load_rows(cfg), tok, cfg)
        ids, labels = ds["input_ids"][0], ds["labels"][0]
        assert ids.count(eos) == 1 and ids[-1] == eos and labels[-1] == eos, cfg
        assert ids.count(bos) == 1 and ids[0] == bos and labels[0] == IGNORE_INDEX, cfg


def test_generation_prompts_take_one_bos_and_no_eos(sp: Any) -> None:
    tok = load_tokenizer(ModelSection(path="embedded:tiny-llama"))
    tok.add_eos_token = True
    tok.padding_side = "left"
    batch = prompt_batch(tok, special_tokens.decide(tok), ["Q: 1", "<s>Q: what is 12?"])
    for row, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                         strict=True):
        real = [t for t, m in zip(row, mask, strict=True) if m]
        assert real.count(tok.bos_token_id) == 1 and real[0] == tok.bos_token_id
        assert tok.eos_token_id not in real


def no_eos_model(tmp_path: Path) -> Path:
    """The embedded model with its tokenizer's EOS removed (seen in the wild)."""
    import shutil

    out = tmp_path / "no-eos"
    shutil.copytree(resolve_path("embedded:tiny-llama"), out)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        doc = json.loads((out / name).read_text())
        doc.pop("eos_token", None)
        if name == "tokenizer_config.json":
            doc["eos_token"] = None
        (out / name).write_text(json.dumps(doc))
    return out


def test_a_tokenizer_without_eos_is_refused_and_model_eos_token_fixes_it(tmp_path: Path) -> None:
    path = no_eos_model(tmp_path)
    with pytest.raises(ConfigError) as exc:
        load_tokenizer(ModelSection(path=str(path)))
    assert "has no EOS token" in str(exc.value) and "model.eos_token" in exc.value.fix
    tok = load_tokenizer(ModelSection(path=str(path), eos_token="</s>"))
    assert tok.eos_token_id == 2 and tok.pad_token == "<unk>"
    with pytest.raises(ConfigError, match=r"model\.eos_token='<end>' is not a token"):
        load_tokenizer(ModelSection(path=str(path), eos_token="<end>"))
    with pytest.raises(ConfigError, match=r"model\.pad_token='<pad>' is not a token"):
        load_tokenizer(ModelSection(path="embedded:tiny-llama", pad_token="<pad>"))


def test_generation_config_stops_at_the_trained_eos(sp: Any, tmp_path: Path) -> None:
    special = special_tokens.decide(sp)
    assert special.bos_id == 1 and special.eos_id == 2 and special.pad_id == 0
    other = GenerationConfig(eos_token_id=[7, 2], bos_token_id=1)
    assert special_tokens.config_warnings(special, GenerationConfig(eos_token_id=7), other) == [
        "the model's config.json ends generation at token id(s) [7], but training ends samples "
        "with '</s>' (id 2); saved outputs get the trained EOS in their generation_config.json"
    ]
    special_tokens.write_generation_config(tmp_path, other, sp)
    saved = GenerationConfig.from_pretrained(tmp_path)
    assert saved.eos_token_id == [2, 7] and saved.pad_token_id == 0
    assert other.eos_token_id == [7, 2]  # the model's own config is not changed
    special_tokens.write_generation_config(tmp_path, None, sp)
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == 2


def test_null_and_blank_values_are_empty_text_never_none(tmp_path: Path, sp: Any) -> None:
    rows = [
        {"instruction": "Add.", "input": None, "output": "5"},
        {"instruction": "Add.", "input": "2 and 3", "output": None},
        {"instruction": "Add.", "input": "", "output": "  "},
        {"instruction": "Add.", "input": "1 and 1", "output": "2"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv = tmp_path / "d.csv"
    csv.write_text("instruction,input,output\nAdd.,,5\nAdd.,2 and 3,\nAdd., ,  \nAdd.,1 and 1,2\n")
    for source in (path, csv):
        cfg = DataSection(
            path=str(source),
            prompt_template="{instruction}\nInput: {input}\nOutput:",
            response_template=" {output}",
        )
        ds, stats = tokenize(load_rows(cfg), sp, cfg)
        assert stats.kept == 2 and stats.dropped_empty == 2, source
        assert stats.empty_fields == {"input": 2, "output": 2}, source
        assert "rows with an empty or missing field" in stats.summary()
        for ids in ds["input_ids"]:
            text = sp.decode(ids)
            assert "None" not in text and "nan" not in text, text
        assert sp.decode(ds["input_ids"][0], skip_special_tokens=True) == "Add.\nInput: \nOutput: 5"


def test_a_list_where_text_is_expected_is_a_data_error(tmp_path: Path, sp: Any) -> None:
    path = tmp_path / "d.jsonl"
    msgs = [{"role": "user", "content": "hi"}]
    path.write_text(json.dumps({"messages": msgs, "a": "x"}) + "\n")
    cfg = DataSection(path=str(path), prompt_template="{messages}", response_template=" {a}")
    with pytest.raises(DataError, match=r"d\.jsonl line 1: placeholder \{messages\} holds a list"):
        tokenize(load_rows(cfg), sp, cfg)
    cfg = DataSection(path=str(path), shape="text", text_field="messages")
    with pytest.raises(DataError, match=r"line 1: data\.text_field 'messages' holds a list"):
        tokenize(load_rows(cfg), sp, cfg)


def test_validate_warns_of_a_foreign_stop_token_and_an_unused_chat_template(
    tmp_path: Path,
) -> None:
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    from llmtrain.config import load_config
    from llmtrain.train.checks import token_warnings

    model = tmp_path / "instruct"
    shutil.copytree(resolve_path("embedded:tiny-llama"), model)
    config = AutoConfig.from_pretrained(model)
    config.eos_token_id = 7
    config.save_pretrained(model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(model)
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"model.path={model}"])
    warnings = token_warnings(cfg, config, load_tokenizer(cfg.model))
    assert len(warnings) == 2, warnings  # config.json (generation_config.json keeps 2), template
    assert warnings[0].startswith("the model's config.json ends generation at token id(s) [7]")
    assert "use data.shape=chat" in warnings[1]
    plain = load_config(REPO / "configs" / "demo.yaml")
    assert token_warnings(plain, AutoConfig.from_pretrained(resolve_path("embedded:tiny-llama")),
                          load_tokenizer(plain.model)) == []
