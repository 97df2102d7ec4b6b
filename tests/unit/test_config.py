from pathlib import Path

import pytest
import yaml

from llmtrain.config import apply_overrides, load_config
from llmtrain.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates_against_the_schema(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.path and cfg.data.path


def test_shipped_configs_cover_every_method() -> None:
    methods = {load_config(p).method.name for p in CONFIGS}
    assert {"full", "layers", "lora", "qlora", "dpo", "orpo"} <= methods


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


BASE = {
    "model": {"path": "embedded:tiny-llama"},
    "data": {"path": "x.jsonl", "prompt_template": "{q}", "response_template": "{a}"},
}


def test_all_errors_reported_at_once_each_naming_its_key(tmp_path: Path) -> None:
    bad = {
        **BASE,
        "training": {"learning_rate": "fast", "per_device_train_batch_size": 0, "lr": 1},
        "lora": {"rank": 8},
    }
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, bad))
    text = info.value.message()
    assert len(info.value.problems) == 4
    for key in ("training.learning_rate", "training.per_device_train_batch_size",
                "training.lr", "lora.rank"):
        assert key in text
    assert "unknown key" in text and "fix:" in text


def test_missing_sections_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {"method": {"name": "lora"}}))
    assert {"model: required; add it", "data: required; add it"} <= set(info.value.problems)


def test_dotted_overrides_parse_yaml_values(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE), ["training.learning_rate=1e-4",
                                              "training.report_to=[none]", "lora.r=4"])
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.training.report_to == ["none"]
    assert cfg.lora.r == 4


@pytest.mark.parametrize("item", ["nokey", "=3", "a..b=1"])
def test_malformed_override_is_a_config_error(item: str) -> None:
    with pytest.raises(ConfigError, match=r"dotted\.key=value"):
        apply_overrides({}, [item])


def test_override_into_a_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"training": 3}, ["training.lr=1"])


def test_training_args_passthrough_checked_against_training_arguments(tmp_path: Path) -> None:
    ok = load_config(write(tmp_path, {**BASE, "training": {"args": {"tf32": True}}}))
    assert ok.training.args == {"tf32": True}
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {**BASE, "training": {"args": {"nonsense_flag": 1}}}))
    assert "nonsense_flag" in info.value.message()
    with pytest.raises(ConfigError, match="own keys"):
        load_config(write(tmp_path, {**BASE, "training": {"args": {"learning_rate": 1}}}))


def test_layers_method_needs_layer_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"method\.layers"):
        load_config(write(tmp_path, {**BASE, "method": {"name": "layers"}}))


def test_retention_keeps_at_least_two(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"output\.keep_checkpoints"):
        load_config(write(tmp_path, {**BASE, "output": {"keep_checkpoints": 1}}))
