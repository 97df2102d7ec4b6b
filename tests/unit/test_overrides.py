"""Command-line overrides: text fields take the raw text, other fields YAML, a bad one names
itself, and the CLI reads overrides and options in any order."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from llmtrain.cli import _parse, build_parser
from llmtrain.config import load_config, parse_override
from llmtrain.errors import ConfigError

BASE = {
    "model": {"path": "embedded:tiny-llama"},
    "data": {"path": "x.jsonl", "prompt_template": "{q}", "response_template": "{a}"},
}


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize(
    ("item", "value"),
    [
        # str fields: every character after '=' is kept, none read as YAML
        ("data.prompt_template=Instruction: {x}\nResponse:", "Instruction: {x}\nResponse:"),
        ("data.prompt_template=Instruction: {x}\\nResponse:", "Instruction: {x}\\nResponse:"),
        ("data.response_template= {answer} # done", " {answer} # done"),
        ("output.dir=runs/#3", "runs/#3"),
        ("data.system_prompt=- [yes]: {no}", "- [yes]: {no}"),
        ("training.lr_scheduler_type=null", "null"),  # not nullable: the text itself
        ("data.path=1e-4", "1e-4"),  # a number-looking path stays text
        ("model.dtype=float16", "float16"),  # a choice among strings
        ("data.prepared_dir=null", None),  # nullable text: null unsets it
        ("model.tokenizer=", ""),
    ],
)
def test_text_fields_take_the_raw_text(item: str, value: object) -> None:
    keys, parsed = parse_override(item)
    assert keys == item.partition("=")[0].split(".")
    assert parsed == value


@pytest.mark.parametrize(
    ("item", "value"),
    [
        ("lora.r=8", 8),
        ("training.learning_rate=0.5", 0.5),  # (YAML 1.1 reads 1e-4 as text; pydantic converts)
        ("training.gradient_checkpointing=true", True),
        ("lora.target_modules=[q_proj, v_proj]", ["q_proj", "v_proj"]),
        ("lora.target_modules=auto", "auto"),
        ("lora.target_modules=[\"a#b\"]", ["a#b"]),  # a quoted '#' is kept
        ("training.args.max_grad_norm=0.5", 0.5),  # inside a free dict: YAML
        ("training.args={tf32: true}", {"tf32": True}),
        ("training.unknown_key=1", 1),  # not a field: YAML, then the schema refuses the key
    ],
)
def test_other_fields_parse_as_yaml(item: str, value: object) -> None:
    assert parse_override(item)[1] == value


@pytest.mark.parametrize(
    ("item", "phrase"),
    [
        ("lora.r=[1", "the value is not valid YAML"),
        ("training.args={a: 1", "the value is not valid YAML"),
        ("training.report_to=[tensorboard, 'x]", "the value is not valid YAML"),
        ("training.learning_rate=1e-4 #fast", "'#' starts a YAML comment"),
        ("lora.target_modules=[q_proj] # v_proj", "'#' starts a YAML comment"),
        ("lora.r", "is not of the form dotted.key=value"),
        ("lora..r=1", "is not of the form dotted.key=value"),
    ],
)
def test_bad_override_is_a_config_error_naming_it(item: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(item)
    assert info.value.exit_code == 64
    assert f"override {item!r}" in info.value.message()
    assert phrase in info.value.message()


def test_schema_problems_from_overrides_say_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE), ["lora.r=sixteen", "training.report_to=[nothing]"])
    text = info.value.message()
    assert text.startswith("the command-line overrides have 2 problem(s):")
    assert "config '" not in text
    assert "override 'lora.r=sixteen': lora.r:" in text
    assert "override 'training.report_to=[nothing]': training.report_to.0:" in text


def test_mixed_problems_name_the_file_and_the_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "lora": {"alpha": "big"}})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["lora.r=sixteen"])
    text = info.value.message()
    assert f"config {str(path)!r} and its command-line overrides have 2 problem(s), 1 from" in text
    assert "  - lora.alpha:" in text
    assert "  - override 'lora.r=sixteen': lora.r:" in text


def test_file_problems_name_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {**BASE, "lora": {"alpha": "big"}})
    with pytest.raises(ConfigError) as info:
        load_config(path, ["lora.r=4"])
    assert info.value.message().startswith(f"config {str(path)!r} has 1 problem(s):")
    assert "override" not in info.value.problems[0]


def test_override_templates_reach_the_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, BASE),
                      ["data.prompt_template=Q #{q}: ", "data.chat_template={{ x }}"])
    assert cfg.data.prompt_template == "Q #{q}: "
    assert cfg.data.chat_template == "{{ x }}"


@pytest.mark.parametrize("reporter", ["wandb", "mlflow"])
def test_reporters_not_installed_are_refused(reporter: str, tmp_path: Path) -> None:
    if importlib.util.find_spec(reporter) is not None:
        pytest.fail(f"{reporter} is installed here: the lock does not hold it")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE), [f"training.report_to=[tensorboard, {reporter}]"])
    assert f"{reporter} cannot be used: not installed" in info.value.message()
    assert f"pip install {reporter}" in info.value.message()
    cfg = load_config(write(tmp_path, BASE), ["training.report_to=[tensorboard]"])
    assert cfg.training.report_to == ["tensorboard"]


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "c.yaml", "--gpu", "h100", "lora.r=4", "--nodes", "2", "a.b=1"],
        ["validate", "--gpu", "h100", "c.yaml", "lora.r=4", "a.b=1", "--nodes", "2"],
        ["validate", "c.yaml", "lora.r=4", "--gpu", "h100", "a.b=1", "--nodes=2"],
    ],
)
def test_cli_reads_overrides_and_options_in_any_order(argv: list[str]) -> None:
    args = _parse(*build_parser(argv[0]), argv)
    assert args.verb == "validate" and args.config == "c.yaml"
    assert args.overrides == ["lora.r=4", "a.b=1"]
    assert args.gpu == "h100" and args.nodes == 2


def test_cli_generate_override_after_out() -> None:
    argv = ["generate", "c.yaml", "--out", "x.jsonl", "generation.max_new_tokens=8"]
    args = _parse(*build_parser("generate"), argv)
    assert str(args.out) == "x.jsonl" and args.overrides == ["generation.max_new_tokens=8"]


def test_cli_usage_error_shows_the_verbs_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(*build_parser("finetune"), ["finetune", "c.yaml", "--epochs", "3"])
    err = capsys.readouterr().err
    assert "usage: llmtrain finetune" in err and "unrecognized arguments: --epochs 3" in err
