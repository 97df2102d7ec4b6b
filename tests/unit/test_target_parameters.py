"""lora.target_parameters: peft's LoRA on a parameter (peft >= 0.17, the current stack), for a
mixture of experts' fused 3-D expert weights, which transformers 5.x keeps as parameters, not
Linear layers. Refused with the reason, before anything is loaded, where peft cannot apply it as
asked; each name checked against the model by validate and by the wrap alike. Training, merge and
reload on Mixtral and Qwen3-MoE: tests/e2e/test_model_families.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from llmtrain import plan, stack
from llmtrain.config import LoraSection, MethodSection, RunConfig, load_config
from llmtrain.errors import EXIT_USAGE, ConfigError
from llmtrain.model.methods import expert_parameter_names, lora_target_parameters, wrap
from llmtrain.train.checks import check_method
from tests.tiny_models import tiny_checkpoint, tiny_config, tiny_model

BASE = {
    "model": {"path": "embedded:tiny-llama"},
    "data": {"path": "x.jsonl", "prompt_template": "{q}", "response_template": "{a}"},
}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PEFT_HAS_IT = stack.at_least("peft", plan.TARGET_PARAMETERS_PEFT)


def config(tmp_path: Path, *overrides: str) -> RunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return load_config(path, list(overrides))


def with_experts(tmp_path: Path, *overrides: str) -> RunConfig:
    return config(tmp_path, f"lora.target_parameters=[{','.join(EXPERTS)}]", *overrides)


def test_the_key_defaults_to_none_and_is_ignored_by_methods_without_lora(tmp_path: Path) -> None:
    assert config(tmp_path).lora.target_parameters == []
    assert with_experts(tmp_path).lora.target_parameters == EXPERTS
    # full trains no adapter: the LoRA section is not read, so nothing is refused
    plan.check(with_experts(tmp_path, "method.name=full"))


@pytest.mark.skipif(PEFT_HAS_IT, reason="the current stack's peft has target_parameters")
def test_the_pinned_stack_refuses_it_naming_peft_and_the_current_stack(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        plan.check(with_experts(tmp_path, "lora.dropout=0"))
    assert info.value.exit_code == EXIT_USAGE
    assert f"peft >= {plan.TARGET_PARAMETERS_PEFT}" in info.value.problem
    assert "peft 0.9.0" in info.value.problem
    assert "w1, w2, w3" in info.value.fix and "make image STACK=current" in info.value.fix


@pytest.mark.skipif(not PEFT_HAS_IT, reason="peft 0.9.0: the stack refuses the key first")
@pytest.mark.parametrize(("overrides", "says", "fix"), [
    ([], "lora.dropout=0.05", "lora.dropout=0"),
    (["lora.dropout=0", "lora.use_dora=true"], "use_dora", "lora.use_dora=false"),
    (["lora.dropout=0", "method.name=qlora"], "qlora", "method.name=lora"),
    (["lora.dropout=0", "distributed.strategy=fsdp"], "strategy=fsdp", "ddp or zero2"),
    (["lora.dropout=0", "distributed.strategy=zero3"], "strategy=zero3", "ddp or zero2"),
    (["lora.dropout=0", "distributed.strategy=zero3_offload"], "zero3_offload", "ddp or zero2"),
    (["method.name=dpo"], "lora.dropout=0.05", "lora.dropout=0"),
])
def test_what_peft_cannot_apply_as_asked_is_refused(
    tmp_path: Path, overrides: list[str], says: str, fix: str
) -> None:
    with pytest.raises(ConfigError) as info:
        plan.check(with_experts(tmp_path, *overrides))
    assert info.value.exit_code == EXIT_USAGE
    assert "lora.target_parameters" in info.value.problem and says in info.value.problem
    assert fix in info.value.fix


@pytest.mark.skipif(not PEFT_HAS_IT, reason="peft 0.9.0: the stack refuses the key first")
@pytest.mark.parametrize("strategy", ["auto", "ddp", "zero2"])
def test_what_peft_applies_passes(tmp_path: Path, strategy: str) -> None:
    plan.check(with_experts(tmp_path, "lora.dropout=0", f"distributed.strategy={strategy}"))


def test_names_are_matched_as_peft_matches_them_and_a_miss_lists_the_expert_weights() -> None:
    model = tiny_model("mixtral")
    experts = expert_parameter_names(model)
    lora = LoraSection(dropout=0.0, target_parameters=["experts.nope"])
    if not experts:  # transformers 4.37.2: each expert is Linear layers w1, w2, w3
        with pytest.raises(ConfigError) as info:
            lora_target_parameters(lora, model, [])
        assert "no fused 3-D expert weights" in info.value.fix
        assert "lora.target_modules" in info.value.fix
        return
    assert experts == sorted(EXPERTS)
    whole = ["model.layers.0.mlp.experts.down_proj"]  # a whole name matches as well
    for names in (EXPERTS, ["experts.gate_up_proj"], whole):
        assert lora_target_parameters(LoraSection(target_parameters=names), model, []) == names
    with pytest.raises(ConfigError) as info:
        lora_target_parameters(lora, model, [])
    assert info.value.exit_code == EXIT_USAGE
    assert "['experts.nope'] name no parameter of this mixtral model" in info.value.problem
    assert all(name in info.value.fix for name in EXPERTS)
    # a suffix must end at a dot, as in peft: "up_proj" is not "gate_up_proj"
    with pytest.raises(ConfigError):
        lora_target_parameters(LoraSection(target_parameters=["up_proj"]), model, [])


# Each was accepted by validate and then failed inside peft in finetune with a traceback (exit 1).
@pytest.mark.parametrize(("target", "extra", "says"), [
    # a Linear's weight while target_modules adapts that Linear: peft "is not a valid target"
    ("q_proj.weight", {"target_modules": ["q_proj"]}, "lora.target_modules adapts already"),
    ("weight", {"target_modules": ["q_proj"]}, "lora.target_modules adapts already"),
    # a norm's 1-D weight: peft's ParamWrapper takes 2-D and 3-D parameters only
    ("input_layernorm.weight", {}, "a 1-D parameter"),
    # a module both adapted and copied whole: peft "modules_to_save cannot be applied"
    ("mlp.experts.gate_up_proj", {"modules_to_save": ["experts"]}, "inside lora.modules_to_save"),
])
def test_what_peft_would_fail_on_inside_finetune_is_refused_by_both_verbs(
    tmp_path: Path, target: str, extra: dict[str, list[str]], says: str
) -> None:
    model = tiny_model("mixtral")
    lora = LoraSection(dropout=0.0, target_parameters=[target], **extra)
    if not expert_parameter_names(model) and target.startswith("mlp.experts"):
        pytest.skip("transformers 4.37.2's Mixtral has no fused expert weights")
    with pytest.raises(ConfigError) as info:  # finetune: the wrap
        wrap(model, MethodSection(name="lora"), lora, gradient_checkpointing=False)
    assert info.value.exit_code == EXIT_USAGE
    assert says in info.value.problem and repr(target) in info.value.problem
    model_dir = tmp_path / "mixtral"  # validate: the same check on the meta-device model
    mixtral = tiny_checkpoint("mixtral", model_dir)
    cfg = config(tmp_path, f"model.path={model_dir}")
    cfg = cfg.model_copy(update={"lora": lora})
    with pytest.raises(ConfigError) as again:
        check_method(cfg, mixtral)
    assert again.value.problem == info.value.problem


@pytest.mark.skipif(not PEFT_HAS_IT, reason="peft 0.9.0 has no target_parameters")
def test_a_linear_weight_outside_target_modules_and_a_router_are_adapted() -> None:
    """peft's LoRA on a parameter works on any 2-D weight its layer's own LoRA does not take."""
    lora = LoraSection(r=2, dropout=0.0, target_modules=["k_proj"],
                       target_parameters=["q_proj.weight", "mlp.gate.weight"])
    model = wrap(tiny_model("mixtral"), MethodSection(name="lora"), lora,
                 gradient_checkpointing=False)
    wrapped = {w.parameter_name for w in model.modules() if type(w).__name__ == "ParamWrapper"}
    assert wrapped == {"weight"}
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.skipif(not PEFT_HAS_IT, reason="peft 0.9.0 has no target_parameters")
def test_wrap_adapts_every_expert_weight_and_validate_checks_names_on_a_weightless_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lora = LoraSection(r=2, dropout=0.0, target_modules=["q_proj"], target_parameters=EXPERTS)
    model = wrap(tiny_model("mixtral"), MethodSection(name="lora"), lora,
                 gradient_checkpointing=False)
    assert sorted(model.peft_config["default"].target_parameters) == sorted(EXPERTS)
    wrappers = [m for m in model.modules() if type(m).__name__ == "ParamWrapper"]
    assert sorted({w.parameter_name for w in wrappers}) == ["down_proj", "gate_up_proj"]
    assert len(wrappers) == 2 * tiny_config("mixtral").num_hidden_layers
    experts = tiny_config("mixtral").num_local_experts
    assert all(w.lora_A["default"].weight.shape[0] == 2 * experts for w in wrappers)  # r each
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(w.lora_B["default"].weight.grad is not None for w in wrappers)

    # auto without the key says which expert weights stay frozen and how to adapt them
    caplog.set_level(logging.INFO, logger="llmtrain.model.methods")
    wrap(tiny_model("mixtral"), MethodSection(name="lora"), LoraSection(r=2),
         gradient_checkpointing=False)
    assert "lora.target_parameters=[mlp.experts.down_proj,mlp.experts.gate_up_proj]" in caplog.text

    # validate: the same names against the model built on the meta device
    model_dir = tmp_path / "mixtral"
    mixtral = tiny_checkpoint("mixtral", model_dir)
    good = with_experts(tmp_path, f"model.path={model_dir}", "lora.dropout=0")
    check_method(good, mixtral)
    bad = config(tmp_path, f"model.path={model_dir}", "lora.dropout=0",
                 "lora.target_parameters=[mlp.experts.w1]")
    with pytest.raises(ConfigError, match="name no parameter"):
        check_method(bad, mixtral)


@pytest.mark.skipif(not PEFT_HAS_IT, reason="peft 0.9.0 has no target_parameters")
def test_disable_adapter_gives_the_base_model_back_the_dpo_reference() -> None:
    """DPO's LoRA reference is the policy under peft's disable_adapter (train/preference.py): the
    expert adapters must switch off with the linear ones."""
    torch.manual_seed(0)
    model = tiny_model("mixtral").eval()
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    lora = LoraSection(r=2, dropout=0.0, target_modules=["q_proj"], target_parameters=EXPERTS,
                       init_lora_weights=False)  # B random: the adapter changes the model
    wrapped = wrap(model, MethodSection(name="lora"), lora, gradient_checkpointing=False)
    with torch.no_grad():
        adapted = wrapped(input_ids=ids).logits
        with wrapped.disable_adapter():
            reference = wrapped(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-3
    torch.testing.assert_close(reference, base)
