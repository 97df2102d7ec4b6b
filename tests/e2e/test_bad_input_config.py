"""Bad config, paths and overrides: `validate` and `finetune` run one check list, so each bad
input exits with the same code (64 config, 65 data) and the same words from both verbs, without
a traceback, before anything is written (issue 17)."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from llmtrain import stack
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

LORA = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
ARITH = '{"question": "1+1", "answer": "2"}\n'


def config(t: Path, **sections: dict) -> str:
    """configs/demo.yaml with `sections` merged in, output.dir under the test's directory."""
    raw = json.loads(json.dumps(LORA))
    raw["output"]["dir"] = str(t / "out")
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = t / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def write(t: Path, name: str, text: str) -> str:
    path = t / name
    path.write_text(text)
    return str(path)


def tokenizer_with_added_tokens(t: Path) -> str:
    """The embedded model's tokenizer plus three tokens the model has no embedding rows for."""
    from llmtrain.config import ModelSection
    from llmtrain.model.load import load_tokenizer

    tok = load_tokenizer(ModelSection(path="embedded:tiny-llama"))
    tok.add_tokens(["<extra_a>", "<extra_b>", "<extra_c>"])
    out = t / "tokenizer"
    tok.save_pretrained(str(out))
    return str(out)


def checkpoint_like(t: Path) -> str:
    """A directory named like a checkpoint without the completion marker."""
    path = t / "ckpt" / "checkpoint-5"
    path.mkdir(parents=True)
    return str(path)


Case = tuple[Callable[[Path], list[str]], int, str]
CASES: dict[str, Case] = {
    # validate and finetune used to disagree (finetune: traceback, 65 instead of 64, IndexError)
    "data file absent": (lambda t: [config(t, data={"path": str(t / "x.jsonl")})],
                         64, "does not exist"),
    "model directory absent": (lambda t: [config(t, model={"path": str(t / "no-model")})],
                               64, "is not a directory"),
    "prompt template with an unbalanced brace": (
        lambda t: [config(t, data={"prompt_template": "Question: {question\nAnswer:"})],
        64, "data.prompt_template: template"),
    "response template with an unbalanced brace": (
        lambda t: [config(t, data={"response_template": " answer}"})],
        64, "data.response_template: template"),
    "prompt template field absent": (
        lambda t: [config(t, data={"prompt_template": "Q: {query}\nA:"})],
        64, "uses {query}, which the data lacks"),
    "response template field absent": (
        lambda t: [config(t, data={"response_template": " {solution}"})],
        64, "uses {solution}, which the data lacks"),
    "added tokens without resized embeddings": (
        lambda t: [config(t, model={"tokenizer": tokenizer_with_added_tokens(t)})],
        64, "the model's vocab_size is"),
    "text field not a column": (
        lambda t: [config(t, data={"shape": "text", "text_field": "body",
                                   "prompt_template": None, "response_template": None})],
        64, "data.text_field 'body' is not a column"),
    "empty dataset": (lambda t: [config(t, data={"path": write(t, "d.jsonl", "\n")})],
                      65, "holds no rows"),
    "invalid json line": (
        lambda t: [config(t, data={"path": write(t, "d.jsonl", ARITH + '{"question": oops}\n')})],
        65, "line 2 is not valid JSON"),
    "max_length shorter than every prompt": (
        lambda t: [config(t, data={"max_length": 8})], 65, "raise data.max_length"),
    "eval_fraction leaves no evaluation row": (
        lambda t: [config(t, data={"path": write(t, "d.jsonl", ARITH * 3)})],
        65, "leaves no evaluation row"),
    # validate used to miss what finetune hit later, after writing config and prepared data
    "output.dir an existing file": (
        lambda t: [config(t), f"output.dir={write(t, 'taken', 'x')}"],
        64, "is an existing file, not a directory"),
    "output.dir below a file": (
        lambda t: [config(t), f"output.dir={write(t, 'taken', 'x')}/run"],
        64, "cannot be created"),
    "data.prepared_dir an existing file": (
        lambda t: [config(t), f"data.prepared_dir={write(t, 'prep', 'x')}"],
        64, "data.prepared_dir"),
    "lora target not in the model": (
        lambda t: [config(t), "lora.target_modules=[c_attn, q_proj]"],
        64, "lora.target_modules ['c_attn'] are not linear layers of this llama model"),
    # peft's LoRA on parameters: refused by the pinned stack's peft; checked against the model
    "lora target parameter on this stack or model": (
        lambda t: [config(t), "lora.target_parameters=[mlp.experts.gate_up_proj]",
                   "lora.dropout=0"],
        64, "lora.target_parameters ['mlp.experts.gate_up_proj'] name no parameter of this "
        "llama model" if stack.at_least("peft", "0.17.0")
        else "lora.target_parameters needs peft >= 0.17.0; this stack has peft 0.9.0"),
    "layers pattern matches nothing": (
        lambda t: [config(t), "method.name=layers", "method.layers=[decoder.*]"],
        64, "matches no parameter"),
    "resume from a non-checkpoint": (
        lambda t: [config(t), f"output.resume={checkpoint_like(t)}"],
        64, "is not a complete llmtrain checkpoint"),
    # overrides: bad YAML, a silent comment, and problems that name the override
    "override not valid YAML": (lambda t: [config(t), "lora.r=[1"],
                                64, "override 'lora.r=[1': the value is not valid YAML"),
    "override cut by a YAML comment": (
        lambda t: [config(t), "training.learning_rate=1e-4 #fast"],
        64, "override 'training.learning_rate=1e-4 #fast': '#' starts a YAML comment"),
    "override of the wrong type": (
        lambda t: [config(t), "lora.r=sixteen"],
        64, "override 'lora.r=sixteen': lora.r: Input should be a valid integer"),
    "override of an unknown key": (
        lambda t: [config(t), "training.learnin_rate=1"],
        64, "override 'training.learnin_rate=1': training.learnin_rate: unknown key"),
    "override template with an unbalanced brace": (
        lambda t: [config(t), "data.prompt_template=Instruction: {question\\nResponse:"],
        64, "data.prompt_template: template"),
    # accepted by the schema but could not work: reporters that are not installed
    "report_to wandb": (lambda t: [config(t), "training.report_to=[wandb]"],
                        64, "wandb cannot be used: not installed"),
    "report_to mlflow": (lambda t: [config(t), "training.report_to=[mlflow]"],
                         64, "mlflow cannot be used: not installed"),
    # a token budget packs micro-batches: padding-free packing only, and a whole sample fits
    "token budget without padding-free packing": (
        lambda t: [config(t), "training.tokens_per_batch=4096"],
        64, "needs data.packing=padding_free (it is none)"),
    "token budget below max_length": (
        lambda t: [config(t), "training.tokens_per_batch=32", "data.packing=padding_free"],
        64, "training.tokens_per_batch=32 is smaller than data.max_length=64"),
    "report_to with wandb in the file": (
        lambda t: [config(t, training={"report_to": ["tensorboard", "wandb"]})],
        64, "training.report_to: wandb cannot be used"),
}


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time: what a run could write."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def error_text(stderr: str, verb: str) -> str:
    head = f"llmtrain {verb}: error: "
    assert head in stderr, stderr
    return stderr.split(head, 1)[1].strip()


def run_verbs(t: Path, args: list[str], verbs: tuple[str, ...]) -> dict[str, tuple[int, str]]:
    """(exit code, error text) per verb; asserts no traceback and that nothing was written."""
    results = {}
    for verb in verbs:
        before = tree(t)
        result = run_cli(verb, *args, cwd=t)
        assert "Traceback" not in result.stderr, result.stderr
        assert tree(t) == before, f"{verb} wrote files: {sorted(set(tree(t)) - set(before))}"
        results[verb] = (result.returncode, error_text(result.stderr, verb))
    return results


@pytest.mark.parametrize("name", sorted(CASES))
def test_validate_and_finetune_refuse_alike(name: str, tmp_path: Path) -> None:
    make_args, code, phrase = CASES[name]
    args = make_args(tmp_path)
    results = run_verbs(tmp_path, args, ("validate", "finetune"))
    (v_code, v_text), (f_code, f_text) = results["validate"], results["finetune"]
    assert v_code == f_code == code, results
    assert phrase in v_text, v_text
    assert "fix:" in v_text
    assert f_text == v_text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["data file absent", "prompt template field absent",
                                  "lora target not in the model", "invalid json line"])
def test_prepare_refuses_alike(name: str, tmp_path: Path) -> None:
    make_args, code, phrase = CASES[name]
    results = run_verbs(tmp_path, make_args(tmp_path), ("validate", "prepare"))
    assert results["validate"][0] == results["prepare"][0] == code
    assert results["prepare"][1] == results["validate"][1]
    assert phrase in results["prepare"][1]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_dir_refused_by_both(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    results = run_verbs(tmp_path, [config(tmp_path), f"output.dir={locked}/run"],
                        ("validate", "finetune"))
    assert results["validate"] == results["finetune"]
    assert results["validate"][0] == 64 and "cannot be written" in results["validate"][1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the login-node case (no GPU)")
@pytest.mark.parametrize("sections", [{"method": {"name": "qlora"}},
                                      {"training": {"precision": "bf16"}},
                                      {"distributed": {"strategy": "zero2"}}],
                         ids=["qlora", "bf16", "zero2"])
def test_login_node_validates_for_a_gpu_node_and_finetune_refuses_here(
    sections: dict, tmp_path: Path
) -> None:
    path = config(tmp_path, **sections)
    checked = run_cli("validate", path, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert (
        "target: a CUDA GPU node, A100 or later (the config needs a GPU); this machine has no GPU"
        in checked.stdout
    )
    before = tree(tmp_path)
    trained = run_cli("finetune", path, cwd=tmp_path)
    assert trained.returncode == 64, trained.stderr
    assert "this machine has none" in trained.stderr
    assert "Traceback" not in trained.stderr
    assert tree(tmp_path) == before


def test_validate_with_gpu_preset_checks_for_a_gpu_node(tmp_path: Path) -> None:
    result = run_cli("validate", config(tmp_path), "--gpu", "a100-80gb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("target: a CUDA GPU node of A100 80 GB (--gpu was given); this machine has no GPU, "
            "which is fine for validate") in result.stdout
    assert "on A100" in result.stdout
    # the plan finetune would make there, with reasons
    assert "plan (as finetune would decide on the target):" in result.stdout
    assert "  precision: bf16 (auto: the GPU computes in bf16)" in result.stdout
    assert "  weight_dtype: bfloat16 (frozen base weights under bf16" in result.stdout


def test_validate_for_a_v100_plans_its_fp16_and_refuses_what_it_cannot_run(
    tmp_path: Path,
) -> None:
    """A V100 (compute capability 7.0) has no bf16 and no flash-attn 2: validate --gpu v100
    plans fp16 and SDPA, and refuses an explicit bf16 (torch would emulate it in fp32) or
    flash_attention_2 (flash-attn raises at the first forward there) with exit 64, as
    finetune on that GPU does."""
    path = config(tmp_path)
    result = run_cli("validate", path, "--gpu", "v100", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("target: a CUDA GPU node of V100 32 GB (--gpu was given: no bf16, fp16 with loss "
            "scaling; no flash-attn 2); this machine has no GPU") in result.stdout
    assert "  precision: fp16 (auto: the GPU has no bf16)" in result.stdout
    assert "attention: sdpa" in result.stdout
    before = tree(tmp_path)
    for override, says in [
        ("training.precision=bf16", "training.precision=bf16 on a GPU without bf16"),
        ("model.attn_implementation=flash_attention_2",
         "cannot run on the target: the GPU is older than compute capability 8.0"),
    ]:
        refused = run_cli("validate", path, override, "--gpu", "v100", cwd=tmp_path)
        assert refused.returncode == 64, refused.stderr
        assert says in refused.stderr and "Traceback" not in refused.stderr
    assert tree(tmp_path) == before


def test_validate_refuses_a_method_strategy_pair_outside_the_table(tmp_path: Path) -> None:
    """qlora is validated with one process and ddp only; zero2 used to pass the check."""
    path = config(tmp_path, method={"name": "qlora"}, distributed={"strategy": "zero2"})
    before = tree(tmp_path)
    result = run_cli("validate", path, cwd=tmp_path)
    assert result.returncode == 64, result.stderr
    text = error_text(result.stderr, "validate")
    assert "method qlora with distributed.strategy=zero2 is not a validated combination" in text
    assert "fix: use distributed.strategy=ddp" in text
    assert "Traceback" not in result.stderr
    assert tree(tmp_path) == before


def tiny_model_dir(t: Path, arch: str) -> str:
    """A tiny random model of `arch` with the embedded tokenizer (vocabulary sized to it)."""
    from llmtrain.config import ModelSection
    from llmtrain.model.load import load_tokenizer
    from tests.tiny_models import tiny_config

    tok = load_tokenizer(ModelSection(path="embedded:tiny-llama"))
    cfg = tiny_config(arch)
    cfg.vocab_size = len(tok)
    from transformers import AutoModelForCausalLM

    out = t / arch
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


@pytest.mark.parametrize("arch", ["gpt2", "falcon", "mixtral"])
def test_validate_passes_models_the_estimator_does_not_cover(arch: str, tmp_path: Path) -> None:
    result = run_cli("validate", config(tmp_path, model={"path": tiny_model_dir(tmp_path, arch)}),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"model: {arch}" in result.stdout
    assert "memory per GPU: the estimate is not available for this architecture" in result.stdout
    assert f"model type {arch!r}" in result.stdout
    if arch == "mixtral":  # a mixture of experts is said to be one, not sized as a dense model
        assert "is a mixture of experts (num_local_experts=4, 2 per token)" in result.stdout


def test_estimate_says_it_does_not_cover_a_mixture_of_experts(tmp_path: Path) -> None:
    path = config(tmp_path, model={"path": tiny_model_dir(tmp_path, "mixtral")})
    result = run_cli("estimate", path, cwd=tmp_path)
    assert result.returncode == 64, result.stderr
    assert "Traceback" not in result.stderr
    assert "'mixtral' is a mixture of experts" in result.stderr
    assert "does not cover this architecture" in result.stderr
    assert "GiB" not in result.stdout  # no number


def test_overrides_and_options_in_any_order(tmp_path: Path) -> None:
    path = config(tmp_path)
    result = run_cli("validate", path, "--gpu", "h100", "lora.r=4", "--nodes", "2",
                     "training.per_device_train_batch_size=12", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # the demo's rows are 21-22 tokens: padded batches 24 wide, not max_length (64)
    assert "micro-batch 12 x 24 tokens, from the lengths of 155 tokenized sample rows" in (
        result.stdout
    )
    # generate reads the override after --out (it used to be "unrecognized arguments")
    gen = run_cli("generate", path, "--out", str(tmp_path / "o.jsonl"), "lora.r=[1",
                  cwd=tmp_path)
    assert gen.returncode == 64
    assert "override 'lora.r=[1'" in gen.stderr
    bad = run_cli("finetune", path, "--epochs", "3", cwd=tmp_path)
    assert bad.returncode == 64
    assert "usage: llmtrain finetune" in bad.stderr and "unrecognized arguments" in bad.stderr


def test_text_override_keeps_braces_colons_and_hashes(tmp_path: Path) -> None:
    result = run_cli("validate", config(tmp_path),
                     "data.prompt_template=Question #1: {question}\nAnswer:", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def test_reporters_refused_only_when_absent() -> None:
    """The refusals above hold because the lock installs neither package; tensorboard is."""
    lock = (REPO / "requirements" / "lock.txt").read_text()
    for name in ("wandb", "mlflow"):
        assert importlib.util.find_spec(name) is None
        assert f"\n{name}==" not in lock
    assert importlib.util.find_spec("tensorboard") is not None
