"""Bad input: a clear one-paragraph message naming the problem and the fix, exit 64 (config or
usage) or 65 (data), and never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli

LORA = yaml.safe_load((REPO / "configs" / "lora.yaml").read_text())


def config(tmp_path: Path, **sections: dict) -> str:
    raw = json.loads(json.dumps(LORA))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def data_file(tmp_path: Path, text: str, name: str = "d.jsonl") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def newer_adapter(tmp_path: Path) -> str:
    """An adapter directory whose config a later peft wrote, with a key that changes the math."""
    path = tmp_path / "adapter"
    path.mkdir()
    config = {"peft_type": "LORA", "peft_version": "99.0", "r": 8, "future_switch": True}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return str(path)


CASES = {
    "unknown key": (lambda t: ["validate", config(t, training={"learnin_rate": 1})],
                    64, "training.learnin_rate: unknown key"),
    "wrong type": (lambda t: ["validate", config(t, lora={"r": "sixteen"})],
                   64, "lora.r: Input should be a valid integer"),
    "config file absent": (lambda t: ["validate", str(t / "nope.yaml")], 64, "does not exist"),
    "invalid yaml": (lambda t: ["validate", data_file(t, "model: [unclosed\n", "c.yaml")],
                     64, "not valid YAML"),
    "malformed override": (lambda t: ["validate", config(t), "training.learning_rate"],
                           64, "dotted.key=value"),
    "missing model path": (lambda t: ["validate", config(t, model={"path": str(t / "no-model")})],
                           64, "is not a directory"),
    "missing data file": (lambda t: ["validate", config(t, data={"path": str(t / "x.jsonl")})],
                          64, "does not exist"),
    "empty dataset": (lambda t: ["validate", config(t, data={"path": data_file(t, "\n")})],
                      65, "holds no rows"),
    "invalid json line": (
        lambda t: ["validate", config(t, data={"path": data_file(
            t, '{"question": "a", "answer": "b"}\n{"question": oops}\n')})],
        65, "line 2 is not valid JSON"),
    "json line not an object": (
        lambda t: ["validate", config(t, data={"path": data_file(t, "[1, 2]\n")})],
        65, "line 1 is a JSON list"),
    "template field absent": (
        lambda t: ["validate", config(t, data={"prompt_template": "Q: {query}\nA:"})],
        64, "uses {query}, which the data lacks"),
    "max_length shorter than prompt": (
        lambda t: ["validate", config(t, data={"max_length": 8})], 65, "raise data.max_length"),
    # validate on a login node checks for the GPU node the config needs (test_bad_input_config)
    "qlora on cpu": (lambda t: ["finetune", config(t, method={"name": "qlora"})],
                     64, "needs a CUDA GPU"),
    "qlora with fsdp": (
        lambda t: ["validate", "--assume-gpu",
                   config(t, method={"name": "qlora"}, distributed={"strategy": "fsdp"})],
        64, "not possible with peft 0.9.0"),
    "bf16 on cpu": (lambda t: ["finetune", config(t, training={"precision": "bf16"})],
                    64, "needs a CUDA GPU"),
    "unknown training arg": (
        lambda t: ["validate", config(t, training={"args": {"not_an_arg": 1}})],
        64, "not TrainingArguments fields: not_an_arg"),
    "layers match nothing": (
        lambda t: ["finetune", config(t, output={"dir": str(t / "o")}),
                   "method.name=layers", "method.layers=[decoder.*]"],
        64, "matches no parameter"),
    "lora target not in model": (
        lambda t: ["finetune", config(t, output={"dir": str(t / "o")}),
                   "lora.target_modules=[c_attn]"],
        64, "are not linear layers"),
    "resume from a non-checkpoint": (
        lambda t: ["finetune", config(t, output={"dir": str(t / "o"), "resume": str(t)})],
        64, "is not a complete llmtrain checkpoint"),
    "unknown verb option": (lambda t: ["finetune", "--epochs", "3"], 64, "usage:"),
    "merge of a non-adapter": (
        lambda t: ["merge", "--base", "embedded:tiny-llama", "--adapter", str(t),
                   "--out", str(t / "m")], 64, "not a LoRA adapter directory"),
    "merge of an adapter of a newer peft": (
        lambda t: ["merge", "--base", "embedded:tiny-llama", "--adapter", newer_adapter(t),
                   "--out", str(t / "m")], 64, "future_switch=true"),
    "generate with an adapter of a newer peft": (
        lambda t: ["generate", config(t), "--adapter", newer_adapter(t), "--prompts",
                   data_file(t, "2 plus 2?\n", "p.txt"), "--out", str(t / "o.jsonl")],
        64, "future_switch=true"),
    # Answers to training rows would pass for a score on held-out ones: refused unless asked.
    "generate without held-out rows": (
        lambda t: ["generate", config(t, output={"dir": str(t / "not-the-run")}), "--out",
                   str(t / "o.jsonl")], 64, "--all-rows to answer every row"),
    "generate prompts file absent": (
        lambda t: ["generate", config(t), "--prompts", str(t / "p.jsonl"), "--out",
                   str(t / "o.jsonl")], 64, "does not exist"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_with_contract_code_and_clear_message(name: str, tmp_path: Path) -> None:
    make_args, code, phrase = CASES[name]
    result = run_cli(*make_args(tmp_path), cwd=tmp_path)
    assert result.returncode == code, result.stderr
    assert phrase in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    if code != 64 or "usage:" not in phrase:
        assert "fix:" in result.stderr


# `python -m llmtrain.cli` where importing deepspeed and bitsandbytes fails, as where neither is
# installed (importlib.util.find_spec answers None for a module set to None in sys.modules).
WITHOUT_OPTIONAL = (
    "import sys; sys.modules['deepspeed'] = sys.modules['bitsandbytes'] = None; "
    "from llmtrain.cli import main; sys.exit(main())"
)
FIX = (
    "fix: run llmtrain inside the llmtrain image (make image or make sif: it has deepspeed and "
    "bitsandbytes), or install the package in this environment"
)


def without_optional(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_OPTIONAL, *args], capture_output=True, text=True, cwd=REPO
    )


def assert_refused(result: subprocess.CompletedProcess[str], problem: str) -> None:
    """Exit 64 with `problem` and the fix, whitespace as the terminal wraps it aside."""
    said = " ".join(result.stderr.split())
    assert result.returncode == 64, result.stderr
    assert problem in said and FIX in said, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("verb", ["validate", "finetune"])
def test_a_setting_whose_package_is_absent_is_refused_where_the_run_trains(
    tmp_path: Path, verb: str
) -> None:
    """Without the package the job would crash after loading the model and data (and Slurm
    would requeue the crash): where the run trains (finetune; validate when its target is this
    machine) it is refused with exit 64, naming the setting, the package and the fix, and
    nothing is written."""
    out = tmp_path / "run"
    result = without_optional(verb, config(tmp_path), "training.optim=adamw_bnb_8bit",
                              f"output.dir={out}")  # fmt: skip
    assert_refused(result, "training.optim=adamw_bnb_8bit needs bitsandbytes, which is not "
                           "installed in this Python environment")  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "setting", "package"),
    [("distributed.strategy=zero2", "distributed.strategy=zero2", "deepspeed"),
     ("method.name=qlora", "method qlora", "bitsandbytes")],
)  # fmt: skip
def test_validate_for_a_gpu_node_warns_of_a_package_this_machine_lacks(
    tmp_path: Path, override: str, setting: str, package: str
) -> None:
    """validate on a login node without a GPU checks for a GPU node, whose environment (the
    image) may have what the login node lacks: a warning, not a refusal."""
    result = without_optional("validate", config(tmp_path), override)
    said = " ".join(result.stderr.split())
    assert result.returncode == 0, result.stderr
    assert (
        f"warning: {setting} needs {package}, which is not installed in this Python environment: "
        "the environment that trains must have it"
    ) in said


def test_a_bitsandbytes_that_cannot_be_imported_is_named(tmp_path: Path) -> None:
    """An installed bitsandbytes whose import fails (0.43 under triton 3.2+: compat.py) is as
    unusable as a missing one, and the reason is shown."""
    broken = tmp_path / "site" / "bitsandbytes"
    broken.mkdir(parents=True)
    failure = "raise ModuleNotFoundError(\"No module named 'triton.ops'\")\n"
    (broken / "__init__.py").write_text(failure)
    result = run_cli("validate", config(tmp_path), "training.optim=paged_adamw_8bit",
                     env={"PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{REPO / 'src'}"})
    assert_refused(result, "training.optim=paged_adamw_8bit needs bitsandbytes, which is "
                           "installed but cannot be imported (ModuleNotFoundError: No module "
                           "named 'triton.ops')")  # fmt: skip
