"""The strategy configs: one source of truth, the values transformers 4.37.2 can read, and the
combinations refused before anything is loaded."""

from __future__ import annotations

import json

import pytest
import yaml

from llmtrain import strategies
from llmtrain.config import load_config
from llmtrain.errors import ConfigError
from tests.conftest import REPO


@pytest.mark.parametrize("name", sorted(strategies.DEEPSPEED))
def test_configs_deepspeed_is_the_package_copy(name: str) -> None:
    link = REPO / "configs" / "deepspeed" / f"{name}.json"
    assert link.is_symlink()
    assert link.resolve() == (REPO / "src" / "llmtrain" / "deepspeed" / f"{name}.json").resolve()
    loaded = strategies.deepspeed_config(name)
    assert loaded == json.loads(link.read_text())
    # "auto" lets TrainingArguments fill in batch sizes, clipping and precision.
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_clipping"):
        assert loaded[key] == "auto"
    assert loaded["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)
    assert "optimizer" not in loaded  # the Trainer's optimizer, also under offload


def test_zero3_saves_whole_16bit_weights_and_zero2_does_not_overlap() -> None:
    for name in ("zero3", "zero3_offload"):
        zero = strategies.deepspeed_config(name)["zero_optimization"]
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert strategies.deepspeed_config("zero2")["zero_optimization"]["overlap_comm"] is False


def test_accelerate_fsdp_config_agrees_with_the_trainer_settings() -> None:
    acc = yaml.safe_load((REPO / "configs" / "accelerate" / "fsdp.yaml").read_text())
    assert acc["distributed_type"] == "FSDP"
    fsdp = acc["fsdp_config"]
    ours = strategies.fsdp_settings("LlamaDecoderLayer")
    assert fsdp["fsdp_use_orig_params"] is (ours["use_orig_params"] == "true") is True
    assert fsdp["fsdp_sync_module_states"] is (ours["sync_module_states"] == "true")
    assert fsdp["fsdp_backward_prefetch"] == ours["fsdp_backward_prefetch"].upper()
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    ddp = yaml.safe_load((REPO / "configs" / "accelerate" / "ddp.yaml").read_text())
    assert ddp["distributed_type"] == "MULTI_GPU"


def test_fsdp_settings_are_strings_where_4_37_2_puts_them_in_the_environment() -> None:
    ours = strategies.fsdp_settings("LlamaDecoderLayer")
    for key in ("use_orig_params", "sync_module_states", "fsdp_backward_prefetch"):
        assert isinstance(ours[key], str), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.name=qlora", "distributed.strategy=fsdp"], "not possible with peft 0.9.0"),
        (["method.name=qlora", "distributed.strategy=zero3"], "not possible with peft 0.9.0"),
        (["method.name=qlora", "distributed.strategy=zero3_offload"], "not possible"),
        (
            ["method.name=layers", "method.layers=[last:1]", "distributed.strategy=fsdp"],
            "method layers with distributed.strategy=fsdp",
        ),
        (["training.args={deepspeed: ds.json}"], "which distributed.strategy owns"),
        (["training.args={fsdp: full_shard}"], "which distributed.strategy owns"),
    ],
)
def test_refused_combinations(overrides: list[str], message: str) -> None:
    cfg = load_config(REPO / "configs" / "lora.yaml", overrides)
    with pytest.raises(ConfigError, match=message):
        strategies.check(cfg)


@pytest.mark.parametrize(
    ("method", "strategy"), [(m, s) for m, ss in strategies.VALIDATED.items() for s in ss]
)
def test_validated_combinations_pass_the_check(method: str, strategy: str) -> None:
    extra = ["method.layers=[last:1]"] if method == "layers" else []
    cfg = load_config(
        REPO / "configs" / "lora.yaml",
        [
            f"method.name={method}",
            *extra,
            f"distributed.strategy={'auto' if strategy == 'single' else strategy}",
        ],
    )
    strategies.check(cfg)


def test_accelerate_launcher_choice_is_adopted_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    world = strategies.World(rank=0, local_rank=0, world_size=2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    auto = load_config(REPO / "configs" / "lora.yaml")
    assert strategies.resolve(auto, world) == "fsdp"
    ddp = load_config(REPO / "configs" / "lora.yaml", ["distributed.strategy=ddp"])
    with pytest.raises(ConfigError, match=r"FSDP config but distributed\.strategy=ddp"):
        strategies.resolve(ddp, world)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="llmtrain selects DeepSpeed itself"):
        strategies.resolve(auto, world)
