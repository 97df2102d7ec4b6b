"""Preference tuning (method dpo, orpo): the losses against their papers' formulas, the pair
masks against SFT's boundary rule, bad rows and unsupported settings refused with their codes."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmtrain import stack
from llmtrain.config import (
    DataSection,
    ModelSection,
    PreferenceSection,
    RunConfig,
    load_config,
)
from llmtrain.data.preference import tokenize_pairs
from llmtrain.data.rows import load_rows
from llmtrain.data.tokenize import tokenize
from llmtrain.errors import ConfigError, DataError
from llmtrain.labels import IGNORE_INDEX
from llmtrain.model.load import load_tokenizer
from llmtrain.sizing import from_config
from llmtrain.sizing.memory import ModelShape, estimate
from llmtrain.train import preference, preference_loss
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ModelSection(path="embedded:tiny-llama"))


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_section(path: Path, **kw) -> DataSection:
    return DataSection(
        path=str(path),
        prompt_template="Question: {prompt}\nAnswer:",
        response_template=" {chosen}",
        **kw,
    )


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_of_two_pairs_is_eq_7_of_rafailov_et_al() -> None:
    """-log sigma(beta log pi(yw)/ref(yw) - beta log pi(yl)/ref(yl)), per pair, by hand."""
    beta = 0.3
    pi_w, pi_l, ref_w, ref_l = [-2.0, -7.5], [-3.0, -1.25], [-2.5, -6.0], [-2.75, -2.0]
    losses, metrics = preference.pair_losses(
        "dpo",
        PreferenceSection(beta=beta),
        torch.tensor(pi_w, dtype=torch.float64),
        torch.tensor(pi_l, dtype=torch.float64),
        torch.tensor(ref_w, dtype=torch.float64),
        torch.tensor(ref_l, dtype=torch.float64),
    )
    for k in range(2):
        # pair 0: beta * ((-2 + 2.5) - (-3 + 2.75)) = 0.3 * 0.75; pair 1: 0.3 * (-1.5 - 0.75)
        margin = beta * ((pi_w[k] - ref_w[k]) - (pi_l[k] - ref_l[k]))
        assert abs(float(losses[k]) - (-log_sigmoid(margin))) < 1e-6
        assert abs(float(metrics["rewards/chosen"][k]) - beta * (pi_w[k] - ref_w[k])) < 1e-6
        assert abs(float(metrics["rewards/rejected"][k]) - beta * (pi_l[k] - ref_l[k])) < 1e-6
        assert abs(float(metrics["rewards/margins"][k]) - margin) < 1e-6
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert abs(float(losses[0]) - 0.58696) < 1e-5  # log(1 + e^-0.225) = log(1.79852), by hand


def test_dpo_variants_are_the_ipo_and_hinge_formulas() -> None:
    chosen, rejected = torch.tensor([-1.0]), torch.tensor([-2.0])
    ref = torch.tensor([-1.5])
    h = (chosen - ref) - (rejected - ref)  # 1.0
    ipo, _ = preference.pair_losses(
        "dpo", PreferenceSection(beta=0.25, loss_type="ipo"), chosen, rejected, ref, ref
    )
    assert abs(float(ipo[0]) - (float(h[0]) - 1 / (2 * 0.25)) ** 2) < 1e-6
    hinge, _ = preference.pair_losses(
        "dpo", PreferenceSection(beta=0.25, loss_type="hinge"), chosen, rejected, ref, ref
    )
    assert abs(float(hinge[0]) - max(0.0, 1 - 0.25 * float(h[0]))) < 1e-6


def test_orpo_loss_is_nll_minus_lambda_log_sigmoid_log_odds() -> None:
    """Hong et al. 2024 eq. 6-7 on the mean token log-probabilities of each answer."""
    lam = 0.2
    c, r = -0.4, -1.3
    losses, metrics = preference.pair_losses(
        "orpo", PreferenceSection(beta=lam), torch.tensor([c]), torch.tensor([r]), None, None
    )
    odds = lambda p: math.exp(p) / (1 - math.exp(p))  # noqa: E731
    expected = -c - lam * log_sigmoid(math.log(odds(c) / odds(r)))
    assert abs(float(losses[0]) - expected) < 1e-6
    assert abs(float(metrics["nll_loss"][0]) - (-c)) < 1e-6


def test_sequence_logps_sum_only_the_labelled_shifted_tokens() -> None:
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.5, 0.5, 3.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 2, 0]])  # token 1 predicted at 0, token 2 at 1
    logp = torch.log_softmax(logits, -1)
    expected = float(logp[0, 0, 2] + logp[0, 1, 0])
    assert abs(float(preference.sequence_logps(logits, labels, average=False)[0]) - expected) < 1e-6
    mean = float(preference.sequence_logps(logits, labels, average=True)[0])
    assert abs(mean - expected / 2) < 1e-6


@pytest.mark.skipif(
    stack.is_current(),
    reason="TRL 1.x (the current stack) has no DPOTrainer.dpo_loss, get_batch_logps or "
    "trl.trainer.orpo_trainer to compare with; the formula tests above run on both stacks",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"),
    [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("hinge", 0.2), ("ipo", 0.0),
     ("ipo", 0.2)],
)
def test_losses_equal_trl_0_8_6s_functions(
    loss_type: str, label_smoothing: float, dtype: torch.dtype
) -> None:
    """preference_loss against the TRL 0.8.6 functions it replaces, called as preference.py
    called them (unbound methods on a namespace of the trainer's attributes): bit for bit."""
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.orpo_trainer import ORPOTrainer

    gen = torch.Generator().manual_seed(7)
    beta = 0.37
    trl_self = SimpleNamespace(
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, reference_free=False,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    sums = [-30 * torch.rand(16, generator=gen, dtype=dtype) for _ in range(4)]
    expected = DPOTrainer.dpo_loss(trl_self, *sums)
    got = preference_loss.dpo_loss(
        *sums, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing
    )
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == dtype and torch.equal(e, g)

    means = [-3 * torch.rand(16, generator=gen, dtype=dtype) - 1e-3 for _ in range(2)]
    term, r_chosen, r_rejected, mean_ratio, mean_log_odds = ORPOTrainer.odds_ratio_loss(
        trl_self, *means
    )
    got_term, got_chosen, got_rejected = preference_loss.odds_ratio_loss(*means, beta=beta)
    assert torch.equal(term, got_term)
    assert torch.equal(r_chosen, got_chosen) and torch.equal(r_rejected, got_rejected)
    log_odds = preference_loss.log_odds_ratio(*means)
    assert float(log_odds.mean()) == mean_log_odds
    assert float(torch.log(torch.sigmoid(log_odds)).mean()) == mean_ratio

    logits = torch.randn(6, 9, 11, generator=gen, dtype=dtype)
    labels = torch.randint(0, 11, (6, 9), generator=gen)
    labels[torch.rand(6, 9, generator=gen) < 0.4] = IGNORE_INDEX
    labels[:, 1] = 3  # every row has a labelled token (the mean of none is 0/0)
    for average in (False, True):
        want = DPOTrainer.get_batch_logps(logits, labels.clone(), average_log_prob=average)
        assert torch.equal(preference_loss.sequence_logps(logits, labels, average=average), want)


def test_pair_masks_cover_only_the_answers_as_sft_masks_its_response(
    tmp_path: Path, tok
) -> None:
    rows = [{"prompt": "What is 4 plus 8?", "chosen": "12", "rejected": "13"}]
    path = jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = pairs_section(path)
    pairs, stats = tokenize_pairs(load_rows(cfg), tok, cfg)
    assert stats.kept == 1
    for side in ("chosen", "rejected"):
        # The same row as SFT data gives the same ids and labels: one boundary rule.
        sft_path = jsonl(tmp_path / f"{side}.jsonl", [{"q": rows[0]["prompt"], "a": rows[0][side]}])
        sft = DataSection(
            path=str(sft_path), prompt_template="Question: {q}\nAnswer:", response_template=" {a}"
        )
        expected, _ = tokenize(load_rows(sft), tok, sft)
        ids, labels = pairs[0][f"{side}_input_ids"], pairs[0][f"{side}_labels"]
        assert ids == expected[0]["input_ids"] and labels == expected[0]["labels"]
        trained = [t for t in labels if t != IGNORE_INDEX]
        assert trained[-1] == tok.eos_token_id
        assert tok.decode(trained[:-1]).strip() == rows[0][side]
        first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
        assert tok.decode(ids[:first]).endswith("Answer:")  # every prompt token is masked
    # The prompts are the same tokens; the answers differ.
    c, r = pairs[0]["chosen_labels"], pairs[0]["rejected_labels"]
    assert c.index(next(t for t in c if t != IGNORE_INDEX)) == r.index(
        next(t for t in r if t != IGNORE_INDEX)
    )


def test_conversation_pairs_train_only_the_final_assistant_message(tmp_path: Path, tok) -> None:
    shared = [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 plus 3?"},
    ]
    shared_form = jsonl(tmp_path / "shared.jsonl", [
        {"prompt": shared, "chosen": "6", "rejected": {"role": "assistant", "content": "7"}},
    ])
    # The UltraFeedback layout: two whole conversations that differ in the last turn.
    whole_form = jsonl(tmp_path / "whole.jsonl", [
        {"chosen": [*shared, {"role": "assistant", "content": "6"}],
         "rejected": [*shared, {"role": "assistant", "content": "7"}]},
    ])
    cfg = DataSection(path=str(shared_form), shape="chat", chat_template="chatml")
    pairs, _ = tokenize_pairs(load_rows(cfg), tok, cfg)
    cfg_whole = cfg.model_copy(update={"path": str(whole_form)})
    whole, _ = tokenize_pairs(load_rows(cfg_whole), tok, cfg_whole)
    assert pairs[0] == whole[0]
    for side, answer in (("chosen", "6"), ("rejected", "7")):
        labels = pairs[0][f"{side}_labels"]
        trained = tok.decode([t for t in labels if t != IGNORE_INDEX])
        assert trained.replace(" ", "") == f"{answer}<|im_end|>".replace(" ", "")
    c, r = pairs[0]["chosen_input_ids"], pairs[0]["rejected_input_ids"]
    first = next(i for i, t in enumerate(pairs[0]["chosen_labels"]) if t != IGNORE_INDEX)
    assert c[:first] == r[:first]  # the shared conversation, untrained, the same tokens


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "q", "chosen": "1"}, "rejected is missing"),
        ({"prompt": "q", "chosen": "1", "rejected": ""}, "rejected is empty"),
        # The reader's check, before the pair's: one type per field.
        ({"prompt": "q", "chosen": 5, "rejected": "1"}, "field 'chosen' holds a number"),
        ({"prompt": "q", "chosen": "1", "rejected": "1"}, "chosen and rejected are the same"),
    ],
)
def test_bad_pair_rows_are_data_errors_naming_file_and_line(
    tmp_path: Path, tok, row: dict, problem: str
) -> None:
    good = {"prompt": "q", "chosen": "1", "rejected": "2"}
    path = jsonl(tmp_path / "pairs.jsonl", [good, good, row])
    cfg = pairs_section(path)
    with pytest.raises(DataError) as exc:
        tokenize_pairs(load_rows(cfg), tok, cfg)
    assert exc.value.exit_code == 65
    assert str(exc.value).startswith(f"pairs.jsonl line 3: {problem}")


def test_conversations_that_differ_before_the_last_turn_are_refused(tmp_path: Path, tok) -> None:
    path = jsonl(tmp_path / "chat.jsonl", [{
        "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}],
        "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "2"}],
    }])
    cfg = DataSection(path=str(path), shape="chat", chat_template="chatml")
    with pytest.raises(DataError, match=r"chat\.jsonl line 1: chosen and rejected differ"):
        tokenize_pairs(load_rows(cfg), tok, cfg)


def run_config(tmp_path: Path, overrides: list[str]) -> RunConfig:
    return load_config(REPO / "configs" / "dpo.yaml", [f"output.dir={tmp_path}", *overrides])


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["method.name=lora"], "preference section is used only with method.name=dpo or orpo"),
        (["method.name=orpo"], "preference.label_smoothing, preference.loss_type belong to dpo"),
        (["preference.loss_type=kto"], "preference.loss_type"),
        (["preference.beta=0"], "preference.beta"),
    ],
)
def test_preference_keys_are_typed_and_checked(
    tmp_path: Path, overrides: list[str], problem: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        run_config(tmp_path, overrides)
    assert exc.value.exit_code == 64
    assert problem in "\n".join(exc.value.problems)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["data.packing=padding_free"], "data.packing=padding_free is not supported for method"),
        (["distributed.strategy=fsdp"], "distributed.strategy=fsdp with method dpo is not tested"),
        (["distributed.strategy=zero2"], "distributed.strategy=zero2 with method dpo"),
    ],
)
def test_unsupported_settings_are_refused_with_the_reason(
    tmp_path: Path, overrides: list[str], problem: str
) -> None:
    cfg = run_config(tmp_path, overrides)
    with pytest.raises(ConfigError) as exc:
        preference.check(cfg)
    assert exc.value.exit_code == 64 and problem in str(exc.value)


def test_policy_config_is_the_trained_weights_method(tmp_path: Path) -> None:
    cfg = run_config(tmp_path, ["preference.weights=full"])
    policy = preference.policy_config(cfg)
    assert policy.method.name == "full" and not policy.training.chunked_loss
    assert preference.policy_config(run_config(tmp_path, [])).method.name == "lora"


def test_memory_estimate_counts_the_reference_copy_of_full_weight_dpo(tmp_path: Path) -> None:
    shape = ModelShape(
        vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4
    )
    full_dpo = from_config.run_shape(run_config(tmp_path, ["preference.weights=full"]), shape)
    lora_dpo = from_config.run_shape(run_config(tmp_path, []), shape)
    assert full_dpo.reference_copy and not lora_dpo.reference_copy
    assert full_dpo.method == "full" and lora_dpo.method == "lora"
    # Each pair is two sequences in one forward.
    assert full_dpo.micro_batch == 2 * 8
    without = estimate(shape, replace(full_dpo, reference_copy=False))
    with_ref = estimate(shape, full_dpo)
    assert with_ref.weights - without.weights == shape.params * full_dpo.dtype_bytes


def test_conversation_pairs_become_generation_prompts_of_the_shared_turns(
    tmp_path: Path, tok
) -> None:
    from llmtrain.data import prompts

    shared = [{"role": "user", "content": "What is 3 plus 3?"}]
    path = jsonl(tmp_path / "chat.jsonl", [{"prompt": shared, "chosen": "6", "rejected": "7"}])
    cfg = DataSection(path=str(path), shape="chat", chat_template="chatml")
    asked = prompts.from_rows(load_rows(cfg), cfg, tok)
    assert asked.prompts == [
        "<|im_start|>user\nWhat is 3 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    ]
    assert asked.references == ["6"] and asked.conversations == [shared]
