"""Several datasets in one run: sources read with their own keys, held out first, then
sampled deterministically. Tokenizer: the embedded SentencePiece."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from llmtrain.config import DataSection, SourceSection
from llmtrain.data.mixture import split_sources, take
from llmtrain.errors import DataError


def rows(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"i": list(range(n))})


def test_take_all_some_or_repeated_rows_deterministically() -> None:
    ds = rows(10)
    assert take(ds, None, 0)["i"] == list(range(10))
    five = take(ds, SourceSection(path="x", rows=5), 3)
    assert len(set(five["i"])) == 5
    assert five["i"] == take(ds, SourceSection(path="x", rows=5), 3)["i"]
    assert five["i"] != take(ds, SourceSection(path="x", rows=5), 4)["i"]
    twice = take(ds, SourceSection(path="x", weight=2.0), 0)["i"]
    assert sorted(twice) == sorted(list(range(10)) * 2)
    assert len(take(ds, SourceSection(path="x", weight=0.25), 0)) == 2  # round(2.5) == 2


def test_a_source_takes_rows_or_weight_not_both() -> None:
    with pytest.raises(ValueError, match="rows or weight, not both"):
        SourceSection(path="x", rows=3, weight=1.0)


def test_data_takes_path_or_sources_and_checks_each_source() -> None:
    with pytest.raises(ValueError, match="not both"):
        DataSection(path="a.jsonl", sources=[SourceSection(path="b.jsonl")], shape="text")
    with pytest.raises(ValueError, match=r"data.sources\[1\]: instruction data needs"):
        DataSection(sources=[SourceSection(path="a.txt", shape="text"),
                             SourceSection(path="b.jsonl")])


def test_held_out_rows_are_split_off_before_repeating(tmp_path: Path) -> None:
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(20)))
    b = tmp_path / "b.txt"
    b.write_text("\n\n".join(f"document {i}" for i in range(10)))
    data = DataSection(
        prompt_template="{q}", response_template=" {a}", eval_fraction=0.2,
        sources=[SourceSection(path=str(a), weight=3.0), SourceSection(path=str(b), shape="text",
                                                                       rows=4)],
    )
    first, second = split_sources(data, seed=7)
    assert (len(first.train), len(first.held_out)) == (48, 4)  # 16 rows x 3, 4 held out
    assert not set(first.train["q"]) & set(first.held_out["q"])
    # plain text is held out later, from its tokenized blocks (one document may be one row)
    assert (len(second.train), second.held_out, second.section.shape) == (4, None, "text")
    again = split_sources(data, seed=7)
    assert again[0].train["q"] == first.train["q"]


def test_the_seed_that_draws_the_split_is_part_of_the_prepared_fingerprint() -> None:
    """training.seed draws the held-out rows and each source's sample: prepared data of
    another seed (a shared data.prepared_dir) held another split and was reused as this one's."""
    from llmtrain.config import load_config
    from llmtrain.data.prepared import fingerprint
    from llmtrain.model.load import load_tokenizer

    repo = Path(__file__).resolve().parents[2]
    a, b = (load_config(str(repo / "configs" / "lora.yaml"), [f"training.seed={s}"])
            for s in (1, 2))
    assert split_sources(a.data, 1)[0].held_out["question"] != split_sources(
        b.data, 2)[0].held_out["question"]
    tok = load_tokenizer(a.model)
    assert fingerprint(a, tok) != fingerprint(b, tok)


def qa_split(path: Path) -> DataSection:
    return DataSection(path=str(path), prompt_template="{q}", response_template=" {a}",
                       eval_fraction=0.2)  # fmt: skip


def assert_apart(data: DataSection, seeds: range, sizes: tuple[int, int]) -> None:
    """No question both held out and trained, and the (train, held-out) sizes, for each seed."""
    for seed in seeds:
        (src,) = split_sources(data, seed=seed)
        assert not set(src.train["q"]) & set(src.held_out["q"])
        assert (len(src.train), len(src.held_out)) == sizes


def test_a_row_repeated_in_the_data_is_never_both_held_out_and_trained(tmp_path: Path) -> None:
    """A row that occurs twice in a file was split by index, so one copy could be held out and
    the other trained: the held-out loss and generate's answers then scored trained text
    (found by a reviewer). Every copy now goes where its first copy goes."""
    path = tmp_path / "a.jsonl"
    distinct = [{"q": f"q{i}", "a": f"a{i}"} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in distinct * 3))  # each row 3 times
    data = qa_split(path)
    assert_apart(data, range(5), (48, 12))  # 4 of 20 distinct rows held out, 3 copies each
    clean = tmp_path / "b.jsonl"
    clean.write_text("".join(json.dumps(r) + "\n" for r in distinct))
    (src,) = split_sources(data.model_copy(update={"path": str(clean)}), seed=3)
    split = datasets.Dataset.from_list(distinct).train_test_split(test_size=0.2, seed=3)
    assert src.held_out["q"] == split["test"]["q"]  # without repeats: train_test_split's


def test_copies_of_one_row_do_not_count_as_rows_to_hold_out(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text((json.dumps({"q": "q", "a": "a"}) + "\n") * 10)
    data = qa_split(path)
    with pytest.raises(DataError, match=r"of the 1 distinct rows of data\.path leaves no"):
        split_sources(data, seed=0)


def test_copies_that_differ_only_in_a_column_nothing_reads_stay_on_one_side(
    tmp_path: Path,
) -> None:
    """Copies of a row with their own `id` (or source name) were distinct rows to the split, so
    one copy was held out and another trained (found by a reviewer): the key is what the
    model reads, the templates' fields (instruction) or the turns (chat)."""
    path = tmp_path / "a.jsonl"
    path.write_text("".join(
        json.dumps({"id": f"{k}-{i}", "q": f"q{i}", "a": f"a{i}"}) + "\n"
        for k in range(2) for i in range(50)
    ))  # fmt: skip
    assert_apart(qa_split(path), range(3), (80, 20))  # 10 of 50 distinct, 2 copies each
    chat = tmp_path / "c.jsonl"
    turns = [[{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
             for i in range(50)]  # fmt: skip
    chat.write_text("".join(
        json.dumps({"id": f"{k}-{i}", "messages": turns[i]}) + "\n"
        for k in range(2) for i in range(50)
    ))  # fmt: skip
    (src,) = split_sources(DataSection(path=str(chat), shape="chat", eval_fraction=0.2), seed=1)
    held = {m[0]["content"] for m in src.held_out["messages"]}
    assert not {m[0]["content"] for m in src.train["messages"]} & held
    assert len(held) == 10
