"""The LoRA variants llmtrain offers from peft (DoRA, rsLoRA, the init choices): typed keys, the
combinations refused before anything is loaded, what reaches peft, the fused path, the estimate."""

from __future__ import annotations

import argparse
import copy
import logging
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from llmtrain import plan, stack
from llmtrain.config import LoraSection, MethodSection, RunConfig, load_config
from llmtrain.errors import EXIT_USAGE, ConfigError
from llmtrain.kernels import lora as fused_lora
from llmtrain.model.load import load_model_config
from llmtrain.model.methods import count_parameters, wrap
from llmtrain.sizing.memory import ModelShape, RunShape, trainable_params
from llmtrain.train.checks import check_method
from tests.tiny_models import tiny_checkpoint, tiny_model
from tests.unit.test_fused_lora import forward_backward, lora_linear

BASE = {
    "model": {"path": "embedded:tiny-llama"},
    "data": {"path": "x.jsonl", "prompt_template": "{q}", "response_template": "{a}"},
}


def config(tmp_path: Path, *overrides: str) -> RunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return load_config(path, list(overrides))


def test_variant_keys_default_to_plain_lora_and_parse_from_overrides(tmp_path: Path) -> None:
    plain = config(tmp_path).lora
    assert (plain.use_dora, plain.use_rslora, plain.init_lora_weights) == (False, False, True)
    cfg = config(tmp_path, "lora.use_dora=true", "lora.use_rslora=true",
                 "lora.init_lora_weights=gaussian")
    assert (cfg.lora.use_dora, cfg.lora.use_rslora, cfg.lora.init_lora_weights) == (
        True, True, "gaussian")
    assert config(tmp_path, "lora.init_lora_weights=false").lora.init_lora_weights is False


@pytest.mark.parametrize(("value", "says"), [
    ("loftq", "replaces the base weights"),
    ("uniform", "'uniform' is not one of true, false, gaussian"),
    ("Gaussian", "'Gaussian' is not one of true, false, gaussian"),
    ("1", "1 is not one of"),
])
def test_init_choices_outside_peft_or_llmtrain_are_refused(
    tmp_path: Path, value: str, says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config(tmp_path, f"lora.init_lora_weights={value}")
    assert info.value.exit_code == EXIT_USAGE
    assert says in info.value.message()
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(
        f"override 'lora.init_lora_weights={value}': lora.init_lora_weights: "
    )


@pytest.mark.parametrize(("overrides", "says"), [
    (["method.name=qlora"], "no DoRA for bitsandbytes 4-bit layers"),
    (["distributed.strategy=fsdp"], "distributed.strategy=fsdp"),
    (["distributed.strategy=zero3"], "distributed.strategy=zero3"),
    (["distributed.strategy=zero3_offload"], "distributed.strategy=zero3_offload"),
])
def test_dora_combinations_peft_cannot_run_are_refused(
    tmp_path: Path, overrides: list[str], says: str
) -> None:
    cfg = config(tmp_path, "lora.use_dora=true", *overrides)
    with pytest.raises(ConfigError) as info:
        plan.check(cfg)
    assert info.value.exit_code == EXIT_USAGE
    assert says in info.value.problem and "lora.use_dora=false" in info.value.fix
    plan.check(cfg.model_copy(update={"lora": LoraSection(use_dora=False)}))


def test_dora_under_an_accelerate_fsdp_launch_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, "lora.use_dora=true")
    for strategy in ("auto", "ddp", "zero2"):
        plan.check(cfg.model_copy(update={"distributed": cfg.distributed.model_copy(
            update={"strategy": strategy})}))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"distributed\.strategy=fsdp"):
        plan.check(cfg)


def test_variants_reach_peft() -> None:
    lora = LoraSection(r=4, alpha=8, dropout=0.0, use_rslora=True, use_dora=True,
                       target_modules=["q_proj", "down_proj"])
    model = wrap(tiny_model("llama"), MethodSection(name="lora"), lora,
                 gradient_checkpointing=False)
    saved = model.peft_config["default"]
    assert (saved.use_rslora, saved.use_dora, saved.init_lora_weights) == (True, True, True)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 2 * 3
    for m in layers:
        assert m.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # not 8 / 4
        magnitude = m.lora_magnitude_vector["default"]
        if stack.is_current():  # peft 0.2x holds the vector in a DoraLinearLayer module
            magnitude = magnitude.weight
        assert magnitude.requires_grad and magnitude.shape == (m.out_features,)
        # DoRA starts at the base weight's row norms (B is zero), so the model is unchanged.
        torch.testing.assert_close(magnitude, m.base_layer.weight.norm(dim=1))


@pytest.mark.parametrize("init", [True, "gaussian", False])
def test_init_lora_weights_choices(init: bool | str) -> None:
    lora = LoraSection(r=4, alpha=8, target_modules=["q_proj"], init_lora_weights=init)
    model = wrap(tiny_model("llama"), MethodSection(name="lora"), lora,
                 gradient_checkpointing=False)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert bool(b.abs().sum() > 0) is (init is False)  # only False starts away from the base
    if init == "gaussian":
        # peft 0.9.0: A ~ N(0, 1/r); Kaiming-uniform A for 32 inputs has std 1/sqrt(3 * 32)
        assert a.std().item() == pytest.approx(1 / 4, rel=0.3)


def test_dora_on_conv1d_layers_is_refused_by_validate_and_wrap(tmp_path: Path) -> None:
    lora = LoraSection(use_dora=True, target_modules=["c_attn"])
    with pytest.raises(ConfigError, match="Conv1D") as info:
        wrap(tiny_model("gpt2"), MethodSection(name="lora"), lora, gradient_checkpointing=False)
    assert "c_attn" in info.value.problem
    # validate: the same check on a weightless copy of the model
    model_dir = tmp_path / "gpt2"
    tiny_checkpoint("gpt2", model_dir)
    cfg = config(tmp_path, f"model.path={model_dir}", "lora.use_dora=true")
    config_ = load_model_config(cfg.model)
    with pytest.raises(ConfigError, match="Conv1D"):
        check_method(cfg, config_)
    check_method(config(tmp_path, f"model.path={model_dir}"), config_)  # plain LoRA is fine


def rslora_layer() -> LoraLinear:
    torch.manual_seed(0)
    layer = lora_linear(nn.Linear(16, 12), use_rslora=True)
    layer.base_layer.weight.requires_grad_(False)
    nn.init.normal_(layer.lora_B["default"].weight)
    return layer


def test_rslora_stays_fused_and_matches_peft_forward_and_gradients() -> None:
    reference = rslora_layer()
    assert reference.scaling["default"] == pytest.approx(4.0)
    layer = copy.deepcopy(reference)
    assert fused_lora.patch(layer) == 1
    x = torch.randn(3, 5, 16)
    want, got = forward_backward(reference, x), forward_backward(layer, x)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    # the scaling is what makes them equal: the plain alpha/r value gives another output
    layer.scaling["default"] = 8 / 4
    assert not torch.allclose(layer(x), reference(x), atol=1e-3)


def test_dora_layers_keep_peft_forward_and_say_so_once(caplog: pytest.LogCaptureFixture) -> None:
    lora = LoraSection(r=4, alpha=8, dropout=0.0, use_dora=True,
                       target_modules=["q_proj", "v_proj"])
    model = wrap(tiny_model("llama"), MethodSection(name="lora"), lora,
                 gradient_checkpointing=False)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            nn.init.normal_(m.lora_B["default"].weight, std=0.1)  # a DoRA term to compute
    reference = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="llmtrain.kernels.lora"):
        assert fused_lora.patch(model) == 0
    dora_lines = [r.getMessage() for r in caplog.records if "DoRA" in r.getMessage()]
    assert len(dora_lines) == 1 and "6 DoRA layers keep peft's forward" in dora_lines[0]
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, LoraLinear))
    ids = torch.randint(0, 128, (2, 9))
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_estimate_counts_dora_magnitude_vectors() -> None:
    dims = {"model_type": "llama", "num_hidden_layers": 3, "hidden_size": 32,
            "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 128}
    shape = ModelShape.from_config(dims)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    plain = trainable_params(shape, RunShape(lora_r=4, lora_targets=targets))
    dora = trainable_params(shape, RunShape(lora_r=4, lora_targets=targets, use_dora=True))
    # out features per block: q 32, k 16, v 16, o 32, gate 64, up 64, down 32
    assert dora - plain == 3 * (32 + 16 + 16 + 32 + 64 + 64 + 32)
    # ... which is what peft 0.9.0 builds on the same model
    for use_dora, want in ((False, plain), (True, dora)):
        lora = LoraSection(r=4, alpha=8, use_dora=use_dora, target_modules=list(targets))
        model = wrap(tiny_model("llama"), MethodSection(name="lora"), lora,
                     gradient_checkpointing=False)
        assert count_parameters(model)[0] == want
    # DoRA is for method lora only (refused with qlora): a qlora shape counts no magnitudes
    qlora = RunShape(method="qlora", lora_r=4, lora_targets=targets)
    assert trainable_params(shape, replace(qlora, use_dora=True)) == trainable_params(shape, qlora)


def test_estimate_of_a_dora_run_counts_magnitudes_and_drops_sharded_rows(tmp_path: Path) -> None:
    from llmtrain.verbs.estimate import report

    args = argparse.Namespace(nodes=1, gpus_per_node=1, gpu="h100", attention=None, tokens=None,
                              mfu=0.4)
    plain, dora = report(config(tmp_path), args), report(config(tmp_path, "lora.use_dora=true"),
                                                        args)
    assert dora["run"]["use_dora"] and not plain["run"]["use_dora"]
    assert (dora["this_run"]["breakdown_bytes"]["optimizer"]
            > plain["this_run"]["breakdown_bytes"]["optimizer"])
    rows = {(r["method"], r["strategy"]) for r in dora["grid"]}
    assert ("lora", "zero2") in rows and ("full", "zero3") in rows
    assert not rows & {("lora", "fsdp"), ("lora", "zero3"), ("lora", "zero3_offload")}
    assert ("lora", "fsdp") in {(r["method"], r["strategy"]) for r in plain["grid"]}
