"""Conversations: chat templates, the loss on assistant turns, bad rows.
Tokenizers: the embedded Llama-2-style SentencePiece and a byte-level BPE (GPT-2/Qwen style,
no BOS) built from the embedded corpus, each with ChatML's two tokens added."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmtrain.config import DataSection, ModelSection, resolve_path
from llmtrain.data import chat
from llmtrain.data.rows import load_rows
from llmtrain.data.tokenize import tokenize
from llmtrain.errors import ConfigError, DataError
from llmtrain.labels import IGNORE_INDEX
from llmtrain.model.load import load_tokenizer

CHATML = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def sp() -> Any:
    tok = load_tokenizer(ModelSection(path="embedded:tiny-llama"))
    tok.add_special_tokens({"additional_special_tokens": CHATML})
    return tok


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    lines = Path(resolve_path("embedded:corpus.txt")).read_text().splitlines()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", *CHATML],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    out = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>",
        additional_special_tokens=CHATML,
    ).save_pretrained(out)
    return load_tokenizer(ModelSection(path=str(out)))


SYSTEM = "You add numbers."
TURNS = [("What is 2 plus 3?", "5"), ("And 4 plus 4?", "The sum is 8.")]


def openai_row(turns: list[tuple[str, str]], system: bool = True) -> dict[str, Any]:
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for q, a in turns:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def sharegpt_row(turns: list[tuple[str, str]], system: bool = True) -> dict[str, Any]:
    conv = [{"from": "system", "value": SYSTEM}] if system else []
    for q, a in turns:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"conversations": conv}


def write(tmp_path: Path, rows: list[dict[str, Any]], name: str = "chat.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# The exact text each template gives an assistant turn: content plus end of turn.
def expected_turn(template: str, content: str, eos: str) -> str:
    return {
        "chatml": f"{content}<|im_end|>",
        "llama-2": f" {content.strip()} {eos}",
        "mistral": f"{content}{eos}",
    }[template]


def trained_texts(tok: Any, text: str, ids: list[int], labels: list[int]) -> list[str]:
    """The characters each run of trained tokens covers, from the tokenizer's own offsets."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = list(enc.offset_mapping)
    shift = len(ids) - len(offsets)  # a BOS the policy prepended
    runs: list[list[int]] = []
    prev = False
    for i, lab in enumerate(labels):
        on = lab != IGNORE_INDEX
        if on and not prev:
            runs.append([])
        if on:
            runs[-1].append(i - shift)
        prev = on
    return [text[offsets[r[0]][0] : offsets[r[-1]][1]] for r in runs]


@pytest.mark.parametrize("template", ["chatml", "llama-2", "mistral"])
@pytest.mark.parametrize("style", ["openai", "sharegpt"])
@pytest.mark.parametrize("n_turns", [1, 2])
@pytest.mark.parametrize("tok_name", ["sp", "bpe"])
def test_trained_spans_are_exactly_the_assistant_turns(
    request: pytest.FixtureRequest, tmp_path: Path, template: str, style: str, n_turns: int,
    tok_name: str,
) -> None:
    tok = request.getfixturevalue(tok_name)
    turns = TURNS[:n_turns]
    row = (openai_row if style == "openai" else sharegpt_row)(turns)
    cfg = DataSection(path=str(write(tmp_path, [row])), shape="chat", chat_template=template)
    ds, stats = tokenize(load_rows(cfg), tok, cfg)
    ids, labels = ds["input_ids"][0], ds["labels"][0]
    turns_ = row["messages" if style == "openai" else "conversations"]
    messages = chat.conversation(turns_, cfg, lambda: "row 1")
    text = chat.render(tok, chat.TEMPLATES[template], messages)
    assert ids[len(ids) - len(tok(text, add_special_tokens=False).input_ids):] == tok(
        text, add_special_tokens=False).input_ids  # the whole conversation, tokenized once
    assert trained_texts(tok, text, ids, labels) == [
        expected_turn(template, a, tok.eos_token) for _, a in turns
    ]
    # BOS at most once, and no EOS appended beyond the template's own turn ends.
    if tok.bos_token_id is not None:
        assert ids.count(tok.bos_token_id) == (n_turns if template == "llama-2" else 1)
    assert stats.kept == 1


def test_train_on_last_turn_or_everything_and_a_default_system_prompt(
    tmp_path: Path, sp: Any
) -> None:
    path = write(tmp_path, [openai_row(TURNS, system=False)])
    last = DataSection(path=str(path), shape="chat", chat_template="chatml",
                       train_on="last_assistant", system_prompt="Be brief.")
    ds, _ = tokenize(load_rows(last), sp, last)
    text = chat.render(sp, chat.TEMPLATES["chatml"], chat.conversation(
        load_rows(last)[0]["messages"], last, lambda: "row 1"))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert trained_texts(sp, text, ds["input_ids"][0], ds["labels"][0]) == [
        "The sum is 8.<|im_end|>"
    ]
    everything = last.model_copy(update={"train_on": "all"})
    ds, _ = tokenize(load_rows(everything), sp, everything)
    assert sum(lab != IGNORE_INDEX for lab in ds["labels"][0]) == len(ds["input_ids"][0]) - 1


def test_overlong_conversations_are_cut_at_a_turn_or_dropped(tmp_path: Path, sp: Any) -> None:
    long_turns = [("What is 2 plus 3?", "5"), ("Now tell me a long story. " * 6, "No. " * 30)]
    path = write(tmp_path, [openai_row(long_turns)])
    cfg = DataSection(path=str(path), shape="chat", chat_template="chatml", max_length=60)
    ds, stats = tokenize(load_rows(cfg), sp, cfg)
    assert stats.truncated == 1 and len(ds["input_ids"][0]) <= 60
    assert sp.decode(ds["input_ids"][0], skip_special_tokens=False).rstrip().endswith(
        "5<|im_end|>"
    )
    drop = cfg.model_copy(update={"overflow": "drop"})
    with pytest.raises(DataError, match="no usable rows"):
        tokenize(load_rows(drop), sp, drop)


@pytest.mark.parametrize(
    ("turns", "problem"),
    [
        ([{"content": "hi"}, {"role": "assistant", "content": "x"}], "turn 1 has no role"),
        ([{"role": "robot", "content": "hi"}], "turn 1 has the unknown role 'robot'"),
        ([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}],
         "turn 1 (user) content is a int, not text"),
        ([], "the conversation is empty"),
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ("hello", "the turns are a str, not a list"),
    ],
)
def test_bad_conversations_name_the_line(tmp_path: Path, turns: Any, problem: str) -> None:
    good = openai_row(TURNS[:1])
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": turns}) + "\n")
    cfg = DataSection(path=str(path), shape="chat", chat_template="chatml")
    with pytest.raises(DataError) as exc:
        chat.conversation(turns, cfg, lambda: "c.jsonl line 3")
    assert str(exc.value).startswith(f"c.jsonl line 3: {problem}")
    if not isinstance(turns, str) and "content is a" not in problem:  # arrow holds these
        with pytest.raises(DataError) as exc:
            tokenize(load_rows(cfg), load_tokenizer(ModelSection(path="embedded:tiny-llama")), cfg)
        assert str(exc.value).startswith(f"c.jsonl line 3: {problem}")


def test_template_choices(sp: Any, tmp_path: Path) -> None:
    path = write(tmp_path, [openai_row(TURNS[:1])])
    plain = load_tokenizer(ModelSection(path="embedded:tiny-llama"))
    with pytest.raises(ConfigError, match="has no chat template of its own") as exc:
        chat.resolve_template(plain, DataSection(path=str(path), shape="chat"))
    assert "chatml, llama-2, mistral, alpaca" in exc.value.fix
    with pytest.raises(ConfigError, match="neither a built-in nor a Jinja template"):
        chat.resolve_template(plain, DataSection(path=str(path), shape="chat",
                                                 chat_template="vicuna"))
    with pytest.raises(ConfigError, match="not a valid Jinja template"):
        chat.resolve_template(plain, DataSection(path=str(path), shape="chat",
                                                 chat_template="{% for m in messages %}"))
    own = load_tokenizer(ModelSection(path="embedded:tiny-llama"))
    own.chat_template = chat.TEMPLATES["mistral"]
    assert chat.resolve_template(own, DataSection(path=str(path), shape="chat")) == \
        chat.TEMPLATES["mistral"]
    assert chat.end_of_turn_id(sp, chat.TEMPLATES["chatml"]) == sp.convert_tokens_to_ids(
        "<|im_end|>")
    assert chat.end_of_turn_id(sp, chat.TEMPLATES["llama-2"]) == sp.eos_token_id


def test_alternation_errors_of_a_template_are_data_errors_with_the_line(
    tmp_path: Path, sp: Any
) -> None:
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}"
              "{% endfor %}")
    row = {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
    cfg = DataSection(path=str(write(tmp_path, [row])), shape="chat", chat_template=strict)
    with pytest.raises(DataError, match=r"chat\.jsonl line 1: the chat template refused"):
        tokenize(load_rows(cfg), sp, cfg)


def test_a_cut_conversation_never_trains_a_turn_that_last_assistant_leaves_out(
    tmp_path: Path, sp: Any
) -> None:
    """train_on=last_assistant trains the final answer only; cutting an over-long conversation
    at an earlier turn would train that earlier answer instead, so the row is dropped."""
    long_turns = [("What is 2 plus 3?", "a draft"), ("Now tell me a long story. " * 6, "5")]
    path = write(tmp_path, [openai_row(long_turns), openai_row(TURNS[:1])])
    cfg = DataSection(path=str(path), shape="chat", chat_template="chatml", max_length=60,
                      train_on="last_assistant")
    ds, stats = tokenize(load_rows(cfg), sp, cfg)
    assert (stats.kept, stats.truncated, stats.dropped_too_long) == (1, 0, 1)
    trained = [t for t, lab in zip(ds["input_ids"][0], ds["labels"][0], strict=True)
               if lab != IGNORE_INDEX]
    assert "draft" not in sp.decode(trained)


def test_openai_weight_zero_leaves_an_assistant_turn_untrained(tmp_path: Path, sp: Any) -> None:
    """OpenAI's chat fine-tuning format marks assistant messages not to learn from with
    `"weight": 0`; it was ignored, so those turns were trained."""
    row = openai_row(TURNS)
    row["messages"][2]["weight"] = 0  # "5"
    row["messages"][4]["weight"] = 1
    path = write(tmp_path, [row])
    cfg = DataSection(path=str(path), shape="chat", chat_template="chatml")
    ds, _ = tokenize(load_rows(cfg), sp, cfg)
    messages = chat.conversation(load_rows(cfg)[0]["messages"], cfg, lambda: "row 1")
    text = chat.render(sp, chat.TEMPLATES["chatml"], messages)
    assert "weight" not in text
    assert trained_texts(sp, text, ds["input_ids"][0], ds["labels"][0]) == [
        "The sum is 8.<|im_end|>"
    ]
    for turn, weight, problem in ((2, 0.5, "has weight 0.5"), (1, 0, "only assistant turns")):
        bad = openai_row(TURNS)
        bad["messages"][turn]["weight"] = weight
        with pytest.raises(DataError, match=problem):
            chat.conversation(bad["messages"], cfg, lambda: "row 1")


def test_an_empty_assistant_reply_is_not_trained(tmp_path: Path, sp: Any) -> None:
    """An empty or blank reply trained the model to end its turn at once; an instruction row
    with an empty response is dropped and counted, and so is a conversation with no reply."""
    mixed = openai_row([("What is 2 plus 3?", "  "), TURNS[1]])
    empty = openai_row([("What is 2 plus 3?", "")])
    path = write(tmp_path, [mixed, empty])
    cfg = DataSection(path=str(path), shape="chat", chat_template="chatml")
    ds, stats = tokenize(load_rows(cfg), sp, cfg)
    assert (stats.kept, stats.dropped_empty) == (1, 1)
    messages = chat.conversation(mixed["messages"], cfg, lambda: "row 1")
    text = chat.render(sp, chat.TEMPLATES["chatml"], messages)
    assert trained_texts(sp, text, ds["input_ids"][0], ds["labels"][0]) == [
        "The sum is 8.<|im_end|>"
    ]


@pytest.mark.parametrize("template", ["llama-2", "mistral", "alpaca"])
def test_a_turn_the_template_leaves_out_is_a_data_error(
    tmp_path: Path, sp: Any, template: str
) -> None:
    """These templates render a system message only as the first turn: one later in the
    conversation vanished, and the reply after it was trained without the instruction."""
    row = openai_row(TURNS, system=False)
    row["messages"].insert(2, {"role": "system", "content": "From now on answer in French."})
    path = write(tmp_path, [openai_row(TURNS[:1]), row])
    cfg = DataSection(path=str(path), shape="chat", chat_template=template)
    with pytest.raises(DataError) as exc:
        tokenize(load_rows(cfg), sp, cfg)
    assert exc.value.problem.startswith(
        "chat.jsonl line 2: the chat template refused the conversation: the chat template "
        "leaves turn 3 (system) out of the text")
    chatml = cfg.model_copy(update={"chat_template": "chatml"})
    assert tokenize(load_rows(chatml), sp, chatml)[1].kept == 2
