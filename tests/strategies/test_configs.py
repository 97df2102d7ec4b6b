"""The strategy configs: one source of truth, the values transformers 4.37.2 can read, and the
combinations refused before anything is loaded."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from llmtrain import compat, plan
from llmtrain.config import load_config
from llmtrain.errors import ConfigError
from llmtrain.plan import Hardware, RunPlan, World
from llmtrain.train import strategies
from tests.conftest import REPO
from tests.tiny_models import tiny_config


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
        plan.check(cfg)


@pytest.mark.parametrize(
    ("method", "strategy"), [(m, s) for m, ss in plan.VALIDATED.items() for s in ss]
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
    plan.check(cfg)


def test_accelerate_launcher_choice_is_adopted_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(rank=0, local_rank=0, world_size=2)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    auto = load_config(REPO / "configs" / "lora.yaml")
    assert plan.resolve_strategy(auto, world)[0] == "fsdp"
    ddp = load_config(REPO / "configs" / "lora.yaml", ["distributed.strategy=ddp"])
    with pytest.raises(ConfigError, match=r"FSDP config but distributed\.strategy=ddp"):
        plan.resolve_strategy(ddp, world)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="llmtrain selects DeepSpeed itself"):
        plan.resolve_strategy(auto, world)


@pytest.mark.parametrize("reduce_dtype", ["fp32", "bf16"])
def test_deepspeed_reduces_gradients_in_the_configured_dtype(reduce_dtype: str) -> None:
    cfg = load_config(
        REPO / "configs" / "full.yaml",
        ["distributed.strategy=zero3", f"distributed.reduce_dtype={reduce_dtype}"],
    )
    world = World(rank=0, local_rank=0, world_size=2)
    gpus = Hardware.gpu_node(flash_attn=False)  # DeepSpeed is GPU-only
    plan.check_world("zero3", world, cuda=True)
    kwargs = strategies.training_kwargs(cfg, RunPlan.build(cfg, world, gpus), "LlamaDecoderLayer")
    assert kwargs["deepspeed"]["communication_data_type"] == reduce_dtype
    assert kwargs["deepspeed"]["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize(("reduce_dtype", "expected"), [("fp32", "float32"), ("bf16", "bfloat16")])
def test_fsdp_mixed_precision_reduces_in_the_configured_dtype(
    reduce_dtype: str, expected: str
) -> None:
    import types

    import torch

    plugin = types.SimpleNamespace(mixed_precision_policy=None)
    strategies._reduce_dtype(plugin, types.SimpleNamespace(bf16=True, fp16=False), reduce_dtype)
    policy = plugin.mixed_precision_policy
    assert policy.param_dtype == torch.bfloat16  # compute stays in bf16
    assert policy.reduce_dtype == getattr(torch, expected)
    fp32_run = types.SimpleNamespace(mixed_precision_policy=None)
    strategies._reduce_dtype(fp32_run, types.SimpleNamespace(bf16=False, fp16=False), "fp32")
    assert fp32_run.mixed_precision_policy is None  # no mixed precision: nothing to change


@pytest.mark.parametrize(("reduce_dtype", "expected"), [("fp32", "float32"), ("bf16", "bfloat16")])
def test_fsdp2_mixed_precision_is_fsdp2s_policy(reduce_dtype: str, expected: str) -> None:
    """The current stack's FSDP2 plugin takes MixedPrecisionPolicy; FSDP1's MixedPrecision
    (with buffer_dtype) is not a policy fully_shard reads."""
    import types

    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = types.SimpleNamespace(mixed_precision_policy=None, fsdp_version=2)
    strategies._reduce_dtype(plugin, types.SimpleNamespace(bf16=True, fp16=False), reduce_dtype)
    policy = plugin.mixed_precision_policy
    assert isinstance(policy, MixedPrecisionPolicy)
    assert (policy.param_dtype, policy.output_dtype) == (torch.bfloat16, torch.bfloat16)
    assert policy.reduce_dtype == getattr(torch, expected)


def test_fsdp_on_cpu_makes_the_world_fsdp_with_the_trainers_plugin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """accelerate (0.26 and 1.x alike) would run DDP on a CPU world asked for FSDP: the CPU
    world becomes FSDP with the plugin the run's TrainingArguments describe, on either stack;
    a GPU world is left to accelerate."""
    import types

    import accelerate
    from accelerate.utils import DistributedType

    from llmtrain import stack

    shared = types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    monkeypatch.setattr(accelerate, "PartialState", lambda: shared)  # the process's real one
    if stack.is_current():  # 5.x: the arguments the Trainer builds its plugin from
        args = types.SimpleNamespace(
            fsdp_plugin_args={"fsdp_version": 2, "transformer_cls_names_to_wrap": "Block"}
        )
    else:  # 4.37.2: the FSDP_* variables TrainingArguments sets, and limit_all_gathers
        monkeypatch.setenv("FSDP_SYNC_MODULE_STATES", "false")  # as fsdp_settings has it
        args = types.SimpleNamespace(fsdp_config={"limit_all_gathers": True})
    state = types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, fsdp_plugin=None)
    trainer = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(state=state), args=args, is_fsdp_enabled=False
    )
    plugin = strategies.fsdp_on_cpu(trainer)
    assert plugin is not None and state.fsdp_plugin is plugin and trainer.is_fsdp_enabled
    assert state.distributed_type == shared.distributed_type == DistributedType.FSDP
    if stack.is_current():
        assert (plugin.fsdp_version, plugin.transformer_cls_names_to_wrap) == (2, "Block")
    else:
        assert plugin.limit_all_gathers is True and plugin.sync_module_states is False
    gpu = types.SimpleNamespace(
        accelerator=types.SimpleNamespace(
            state=types.SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)
        )
    )
    assert strategies.fsdp_on_cpu(gpu) is None  # accelerate makes GPU worlds FSDP itself


def test_fsdp_needs_a_launcher_and_on_cpu_two_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    one = World(rank=0, local_rank=0, world_size=1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ConfigError, match="needs a launcher"):
        plan.check_world("fsdp", one, cuda=True)
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun --nproc-per-node=1 on a GPU
    plan.check_world("fsdp", one, cuda=True)
    with pytest.raises(ConfigError, match="on CPU two processes or more"):
        plan.check_world("fsdp", one, cuda=False)
    plan.check_world("fsdp", World(rank=0, local_rank=0, world_size=2), cuda=False)


@pytest.mark.parametrize("strategy", [s for s, spec in plan.STRATEGIES.items() if spec.needs_cuda])
def test_deepspeed_needs_cuda(strategy: str) -> None:
    two = World(rank=0, local_rank=0, world_size=2)
    with pytest.raises(ConfigError, match="needs CUDA GPUs"):
        plan.check_world(strategy, two, cuda=False)
    plan.check_world(strategy, two, cuda=True)


@pytest.mark.skipif(
    not compat.needs_peft_deepspeed_resume(),
    reason="the shim backports transformers 4.38's fix to the pinned stack; the current stack "
    "has the fix itself and the shim is off there",
)
def test_peft_deepspeed_resume_loads_without_the_frozen_weights(tmp_path: Path) -> None:
    """The backported 4.38 fix, scoped to train(). The engine is a stub standing for DeepSpeed's
    (which needs CUDA here); the GPU suite resumes real ZeRO-2/3 checkpoints."""
    import types

    import transformers.trainer as hf_trainer
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    calls: list[dict[str, object]] = []

    class Engine:
        def load_checkpoint(self, path: str, **kwargs: object) -> tuple[str, dict[str, object]]:
            calls.append({"path": path, **kwargs})
            return path, {}

    (tmp_path / "global_step2").mkdir()
    lora = get_peft_model(
        LlamaForCausalLM(tiny_config("llama")), LoraConfig(r=2, target_modules=["q_proj"])
    )
    original = hf_trainer.deepspeed_load_checkpoint
    peft_trainer = types.SimpleNamespace(model=lora, args=types.SimpleNamespace(deepspeed={}))
    with compat.peft_deepspeed_resume(peft_trainer):
        hf_trainer.deepspeed_load_checkpoint(Engine(), str(tmp_path))
        with pytest.raises(ValueError, match="Can't find a valid checkpoint"):
            hf_trainer.deepspeed_load_checkpoint(Engine(), str(tmp_path / "global_step2"))
    assert hf_trainer.deepspeed_load_checkpoint is original
    assert calls == [
        {
            "path": str(tmp_path),
            "load_optimizer_states": True,
            "load_lr_scheduler_states": True,
            "load_module_strict": False,
        }
    ]
    full = types.SimpleNamespace(model=lora.base_model.model, args=peft_trainer.args)
    with compat.peft_deepspeed_resume(full):
        assert hf_trainer.deepspeed_load_checkpoint is original  # full models load strictly


@pytest.mark.parametrize(
    ("overrides", "package"),
    [(["distributed.strategy=zero3"], "deepspeed"), (["method.name=qlora"], "bitsandbytes"),
     (["training.optim=lion_8bit"], "bitsandbytes"),
     (["training.optim=adamw_apex_fused"], "apex")],
)  # fmt: skip
def test_a_setting_whose_package_is_absent_is_refused_where_the_run_trains(
    overrides: list[str], package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finetune's check (and validate's on the machine it checks for): exit 64 before the
    model is loaded, where the job would crash at the strategy's, quantizer's or optimizer's
    import; elsewhere (a login node checking for a GPU node, prepare) a warning. With the
    package importable the same config passes."""
    from llmtrain.train.checks import check_packages

    cfg = load_config(REPO / "configs" / "lora.yaml", overrides)
    if importlib.util.find_spec(package) is not None:
        assert check_packages(cfg, trains_here=True) == []
    monkeypatch.setitem(sys.modules, package, None)  # find_spec answers None, as if absent
    with pytest.raises(ConfigError, match=f"needs {package}, which is not installed"):
        check_packages(cfg, trains_here=True)
    (warning,) = check_packages(cfg, trains_here=False)
    assert f"needs {package}, which is not installed" in warning
    assert "the environment that trains must have it" in warning
