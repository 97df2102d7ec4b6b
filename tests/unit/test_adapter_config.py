"""An adapter written by a newer peft loads where its keys change nothing, and is refused (exit 64)
where they do: peft 0.21 (the current stack) writes 18 keys into adapter_config.json that peft
0.9.0's LoraConfig (the pinned stack) does not know, and 0.9.0 failed `llmtrain merge` and
`generate --adapter` on the first with a TypeError. The decisions are checked against 0.9.0's
fields on both stacks; the loads with the installed peft, whose adapter gets the newer keys added.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmtrain import stack
from llmtrain.config import ModelSection
from llmtrain.errors import EXIT_USAGE, ConfigError
from llmtrain.model import adapter_config, export
from tests.tiny_models import tiny_checkpoint

# The fields of peft 0.9.0's LoraConfig (dataclasses.fields), the pinned stack's.
PINNED_FIELDS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out",
    "inference_mode", "init_lora_weights", "layers_pattern", "layers_to_transform",
    "loftq_config", "lora_alpha", "lora_dropout", "megatron_config", "megatron_core",
    "modules_to_save", "peft_type", "r", "rank_pattern", "revision", "target_modules",
    "task_type", "use_dora", "use_rslora",
}  # fmt: skip
# What peft 0.21.2 writes into every LoRA adapter_config.json beyond those, with its values as
# `llmtrain finetune` on the current stack wrote them: each feature off.
NEWER_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "exclude_modules": None,
    "kasa_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "lora_ga_config": None,
    "monteclora_config": None,
    "peft_version": "0.21.2",
    "qalora_group_size": 16,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
# The keys 0.9.0 knows, as the current stack's finetune wrote them.
KNOWN = {
    "alpha_pattern": {},
    "auto_mapping": None,
    "base_model_name_or_path": "embedded/tiny-llama",
    "bias": "none",
    "fan_in_fan_out": False,
    "inference_mode": True,
    "init_lora_weights": True,
    "layers_pattern": None,
    "layers_to_transform": None,
    "loftq_config": {},
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "modules_to_save": None,
    "peft_type": "LORA",
    "r": 16,
    "rank_pattern": {},
    "revision": None,
    "target_modules": ["k_proj", "q_proj", "v_proj", "o_proj"],
    "task_type": "CAUSAL_LM",
    "use_dora": False,
    "use_rslora": False,
}
WRITTEN = {**KNOWN, **NEWER_DEFAULTS}
ADAPTER = Path("runs/lora/final/adapter")
# Keys of peft 0.21 set so that they change what the adapter computes, and a key of a later peft.
MATH = [
    ("target_parameters", ["mlp.experts.gate_up_proj"]),
    ("lora_bias", True),
    ("alora_invocation_tokens", [32, 7, 9]),
    ("trainable_token_indices", [3, 4]),
    ("layer_replication", [[0, 2], [1, 3]]),
    ("exclude_modules", ["o_proj"]),
    ("use_qalora", True),
    ("ensure_weight_tying", True),
    ("use_bdlora", {"target_a": True}),
    ("velora_config", {"num_groups": 64}),
    ("future_scale", 0),  # a number is a setting, not "off", though 0 == False
]


def test_every_key_peft_021_writes_beyond_090_is_off_by_default_and_dropped() -> None:
    assert set(NEWER_DEFAULTS) == set(WRITTEN) - PINNED_FIELDS
    assert adapter_config.readable_keys(WRITTEN, PINNED_FIELDS, adapter=ADAPTER) == KNOWN


def test_known_keys_are_kept_as_written_whatever_their_value() -> None:
    raw = {**WRITTEN, "use_dora": True, "revision": "v2", "base_model_name_or_path": "/m/b"}
    kept = adapter_config.readable_keys(raw, PINNED_FIELDS, adapter=ADAPTER)
    assert kept == {key: raw[key] for key in PINNED_FIELDS}


@pytest.mark.parametrize(("key", "value"), MATH)
def test_a_key_that_changes_the_math_is_refused_naming_it_the_writer_and_the_fix(
    key: str, value: Any
) -> None:
    with pytest.raises(ConfigError) as info:
        adapter_config.readable_keys({**WRITTEN, key: value}, PINNED_FIELDS, adapter=ADAPTER)
    assert info.value.exit_code == EXIT_USAGE
    assert f"adapter {ADAPTER} was written by peft 0.21.2" in info.value.problem
    assert f"peft {stack.installed('peft')} does not know" in info.value.problem
    assert any(p.startswith(f"{key}={json.dumps(value)}: ") for p in info.value.problems)
    assert "peft>=0.21.2" in info.value.fix
    assert ("make image STACK=current" in info.value.fix) is not stack.is_current()
    assert ("make venv STACK=current" in info.value.fix) is not stack.is_current()


def test_every_such_key_is_named_at_once_and_a_file_without_peft_version_says_newer() -> None:
    raw = {**WRITTEN, "lora_bias": True, "target_parameters": ["w"]}
    del raw["peft_version"]
    with pytest.raises(ConfigError) as info:
        adapter_config.readable_keys(raw, PINNED_FIELDS, adapter=ADAPTER)
    assert "written by a newer peft" in info.value.problem
    assert [p.split(":")[0] for p in info.value.problems] == [
        "lora_bias=true",
        'target_parameters=["w"]',
    ]
    assert "the newer peft that wrote it" in info.value.fix


@pytest.mark.parametrize(
    ("extra", "inert"),
    [
        ({"qalora_group_size": 64}, True),  # its switch use_qalora is off
        ({"qalora_group_size": 16, "use_qalora": True}, False),
        ({"eva_config": {"rho": 2.0}}, True),  # an init config under init_lora_weights=true
        ({"eva_config": {"rho": 2.0}, "init_lora_weights": "eva"}, False),
        ({"corda_config": {"cache_file": "c.pt"}}, True),
        ({"lora_ga_config": {"direction": "ArB2r"}}, True),
        ({"peft_version": "0.99.0"}, True),
        ({"runtime_config": {"ephemeral_gpu_offload": True}}, True),
        ({"target_parameters": []}, True),
        ({"exclude_modules": ""}, True),
        ({"trainable_token_indices": {}}, True),
    ],
)
def test_a_companion_is_inert_whatever_its_value_while_its_switch_is_off(
    extra: dict[str, Any], inert: bool
) -> None:
    raw = {**WRITTEN, **extra}
    if inert:
        assert adapter_config.readable_keys(raw, PINNED_FIELDS, adapter=ADAPTER) == {
            key: raw[key] for key in PINNED_FIELDS
        }
    else:
        with pytest.raises(ConfigError):
            adapter_config.readable_keys(raw, PINNED_FIELDS, adapter=ADAPTER)


def test_the_installed_peft_reads_its_own_fields_and_refuses_an_unknown_type() -> None:
    from peft import LoraConfig

    known = adapter_config.known_keys({"peft_type": "LORA"}, adapter=ADAPTER)
    assert set(LoraConfig().to_dict()) <= known
    assert known >= PINNED_FIELDS
    with pytest.raises(ConfigError) as info:
        adapter_config.known_keys({"peft_type": "FUTURE", "peft_version": "9.0"}, adapter=ADAPTER)
    assert info.value.exit_code == EXIT_USAGE
    assert "'FUTURE'" in info.value.problem and "peft>=9.0" in info.value.fix


@pytest.mark.skipif(not stack.is_current(), reason="the pinned stack lacks the newer keys")
def test_the_current_stack_knows_every_key_it_writes_and_drops_nothing() -> None:
    known = adapter_config.known_keys(WRITTEN, adapter=ADAPTER)
    assert adapter_config.readable_keys(WRITTEN, known, adapter=ADAPTER) == WRITTEN


@pytest.mark.parametrize(
    ("text", "says"),
    [("{not json", "cannot be read as JSON"), ('{"r": 8}', "no peft_type"), ("[]", "no peft_type")],
)
def test_a_file_that_is_no_peft_config_is_refused(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ConfigError) as info:
        adapter_config.peft_config(tmp_path)
    assert info.value.exit_code == EXIT_USAGE and says in info.value.problem


# --- loading: the installed peft's adapter, then the same with the keys a newer peft writes --


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model dir, adapter dir): a tiny Llama and a LoRA adapter with random A and B (as
    after training: not the no-op that init_lora_weights=true starts from), saved by peft."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("newer_adapter")
    base = root / "base"
    tiny_checkpoint("llama", base)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
        init_lora_weights=False,
    )  # fmt: skip
    get_peft_model(model, config).save_pretrained(str(root / "adapter"))
    return base, root / "adapter"


def with_keys(adapter: Path, into: Path, keys: dict[str, Any]) -> Path:
    """A copy of `adapter` whose adapter_config.json also holds `keys` (where it lacks them)."""
    shutil.copytree(adapter, into)
    path = into / "adapter_config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**keys, **raw}, indent=2))
    return into


def logits(model: Any) -> torch.Tensor:
    ids = torch.tensor([[1, 15, 27, 99, 3, 200, 41, 7]])
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits.float().cpu()


def test_an_adapter_with_the_newer_keys_loads_and_merges_as_without_them(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    base_dir, adapter = trained
    newer = with_keys(adapter, tmp_path / "newer", NEWER_DEFAULTS)
    base = ModelSection(path=str(base_dir))
    if stack.is_current():  # its peft knows every key: peft reads the file itself
        assert adapter_config.peft_config(newer) is None
    else:
        config = adapter_config.peft_config(newer)
        assert config is not None and config.target_modules == {"q_proj", "v_proj"}
    expected = logits(export.load_for_inference(base, adapter, dtype=torch.float32)[0])
    plain = logits(export.load_for_inference(base, None, dtype=torch.float32)[0])
    assert (expected - plain).abs().max() > 1e-2  # the adapter changes the logits
    loaded = logits(export.load_for_inference(base, newer, dtype=torch.float32)[0])
    assert torch.equal(loaded, expected)
    out = export.merge(base, newer, tmp_path / "merged", torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
    assert torch.allclose(logits(merged), expected, atol=1e-5)


@pytest.mark.parametrize("key", ["lora_bias", "future_switch"])
def test_an_adapter_with_a_math_key_is_refused_before_the_base_loads_and_writes_nothing(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    if key in adapter_config.known_keys({"peft_type": "LORA"}, adapter=ADAPTER):
        pytest.skip(f"this peft has {key} (a later key stands for it: future_switch)")
    base_dir, adapter = trained
    newer = with_keys(adapter, tmp_path / "newer", {**NEWER_DEFAULTS, key: True})

    def no_base(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(export, "load_model", no_base)
    base = ModelSection(path=str(base_dir))
    with pytest.raises(ConfigError) as info:
        export.load_for_inference(base, newer, dtype=torch.float32)
    assert info.value.exit_code == EXIT_USAGE and f"{key}=true" in info.value.problems[0]
    with pytest.raises(ConfigError):
        export.merge(base, newer, tmp_path / "merged", torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["newer"]


def test_a_merge_refused_at_the_tokenizer_leaves_no_temporary_folder(
    trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tokenizer is loaded before the merged weights are written: a tokenizer.json this
    stack cannot read (exit 64) used to leave .merged.tmp behind with the weights in it."""
    base_dir, adapter = trained

    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise ConfigError("the tokenizer.json cannot be read", "a fix")

    monkeypatch.setattr(export, "load_tokenizer", unreadable)
    with pytest.raises(ConfigError):
        export.merge(ModelSection(path=str(base_dir)), adapter, tmp_path / "merged", torch.float32)
    assert list(tmp_path.iterdir()) == []
