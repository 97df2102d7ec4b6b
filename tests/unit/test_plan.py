"""The RunPlan and the one strategy x method table: every pair outside the validated set is
refused (or listed as knowingly allowed), every copy of the names agrees with the table, and
training and the estimator read one policy (issue 15)."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import replace
from typing import Any, get_args

import pytest

from llmtrain import plan
from llmtrain.config import DistributedSection, MethodSection, load_config
from llmtrain.errors import EXIT_USAGE, ConfigError, NeedsGpuError
from llmtrain.plan import STRATEGIES, Hardware, RunPlan, World
from llmtrain.sizing import memory
from llmtrain.sizing.from_config import model_shape, run_shape, target_plan, weight_bytes
from llmtrain.sizing.gpus import get_gpu
from llmtrain.sizing.memory import ModelShape
from tests.conftest import REPO
from tests.tiny_models import tiny_config

CPU = Hardware(cuda=False, bf16=False, flash_attn=False)
BF16_GPU = Hardware.gpu_node(flash_attn=False)
FP16_GPU = Hardware(cuda=True, bf16=False, flash_attn=False)
ONE = World(rank=0, local_rank=0, world_size=1)
TWO = World(rank=0, local_rank=0, world_size=2)
CONFIG_STRATEGIES = [s for s in get_args(DistributedSection.model_fields["strategy"].annotation)]
CONFIG_METHODS = list(get_args(MethodSection.model_fields["name"].annotation))


def cfg_for(method: str, strategy: str, *more: str) -> Any:
    extra = ["method.layers=[last:1]"] if method == "layers" else []
    return load_config(
        REPO / "configs" / "lora.yaml",
        [f"method.name={method}", *extra, f"distributed.strategy={strategy}", *more],
    )


def test_names_agree_with_the_table() -> None:
    """config.py's Literals, plan.py's and the estimator's name the table's strategies."""
    assert set(get_args(plan.Strategy)) == set(STRATEGIES)
    assert set(CONFIG_STRATEGIES) == set(STRATEGIES) - {"single"} | {"auto"}
    assert list(plan.ALL_METHODS) == CONFIG_METHODS
    assert set(memory.STRATEGIES) == set(STRATEGIES) - {"single"}
    assert set(get_args(memory.Strategy)) == set(memory.STRATEGIES)
    assert list(memory.METHODS) == ["inference", *plan.METHODS]
    assert set(get_args(memory.Method)) == set(memory.METHODS)
    for method in plan.METHODS:
        assert plan.VALIDATED[method], method  # every method trains somewhere


@pytest.mark.parametrize(
    ("method", "strategy"), [(m, s) for m in CONFIG_METHODS for s in CONFIG_STRATEGIES]
)
def test_every_pair_outside_the_validated_set_is_refused(method: str, strategy: str) -> None:
    cfg = cfg_for(method, strategy)
    table_name = "ddp" if strategy == "auto" else strategy  # auto: single or ddp, same methods
    validated = method in STRATEGIES[table_name].methods
    allowed = (method, table_name) in plan.KNOWINGLY_ALLOWED
    if validated or allowed:
        plan.check(cfg)
        return
    with pytest.raises(ConfigError) as info:
        plan.check(cfg)
    assert info.value.exit_code == EXIT_USAGE
    assert f"method {method} with distributed.strategy={strategy}" in info.value.problem
    # the fix names a strategy that this method is validated with
    assert any(s in info.value.fix for s in plan.VALIDATED[method] if s != "single")


def test_knowingly_allowed_pairs_carry_a_reason_and_are_not_validated() -> None:
    for (method, strategy), reason in plan.KNOWINGLY_ALLOWED.items():
        assert method not in STRATEGIES[strategy].methods and reason.strip()


def test_qlora_with_zero2_is_refused() -> None:
    """VALIDATED lists single and ddp for qlora; check used to let zero2 through."""
    with pytest.raises(ConfigError) as info:
        plan.check(cfg_for("qlora", "zero2"))
    assert "not a validated combination" in info.value.problem
    assert "distributed.strategy=ddp" in info.value.fix


def test_readme_table_is_the_table() -> None:
    header = ["ddp", "fsdp", "zero2", "zero3", "zero3_offload"]
    lines = [
        "| method | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
        *(
            f"| {m} | "
            + " | ".join("yes" if m in STRATEGIES[s].methods else "-" for s in header)
            + " |"
            for m in plan.METHODS
        ),
    ]
    assert "\n".join(lines) in (REPO / "README.md").read_text()


@pytest.mark.parametrize(
    ("method", "strategy", "world", "hw", "expected"),
    [
        ("lora", "auto", ONE, CPU, dict(strategy="single", precision="fp32",
                                        weight_dtype="float32", autocast=False,
                                        optim="adamw_torch", fused_lora=True)),
        ("lora", "auto", TWO, BF16_GPU, dict(strategy="ddp", precision="bf16",
                                             weight_dtype="bfloat16", autocast=True,
                                             optim="adamw_torch_fused", fused_lora=True)),
        ("full", "auto", ONE, BF16_GPU, dict(weight_dtype="float32", autocast=True)),
        ("full", "auto", ONE, FP16_GPU, dict(precision="fp16", weight_dtype="float32")),
        ("lora", "auto", ONE, FP16_GPU, dict(precision="fp16", weight_dtype="float16")),
        # DeepSpeed and FSDP compute in 16 bits themselves: no autocast
        ("full", "zero2", TWO, BF16_GPU, dict(autocast=False, chunked_loss=True)),
        ("full", "fsdp", TWO, BF16_GPU, dict(autocast=False, chunked_loss=False)),
        ("lora", "zero2", TWO, BF16_GPU, dict(fused_lora=True, chunked_loss=True)),
        ("lora", "zero3", TWO, BF16_GPU, dict(fused_lora=False, chunked_loss=False)),
        ("lora", "zero3_offload", TWO, BF16_GPU, dict(fused_lora=False, chunked_loss=False)),
        ("qlora", "auto", ONE, BF16_GPU, dict(quantized=True, adapter=True, fused_lora=False,
                                              weight_dtype="bfloat16")),
        ("layers", "auto", ONE, BF16_GPU, dict(adapter=False, weight_dtype="float32")),
    ],
)
def test_plan_decides(
    method: str, strategy: str, world: World, hw: Hardware, expected: dict[str, Any]
) -> None:
    p = RunPlan.build(cfg_for(method, strategy), world, hw)
    for name, value in expected.items():
        assert getattr(p, name) == value, (name, p.reasons[name])
    assert p.adapter is (method in ("lora", "qlora"))
    recorded = json.loads(json.dumps(p.to_dict()))  # what manifest.json holds
    assert set(recorded) == {
        "strategy", "precision", "weight_dtype", "autocast", "attention", "optim",
        "chunked_loss", "fused_lora", "adapter", "quantized", "master_weights",
    }
    assert all(d["reason"] for d in recorded.values()), recorded
    assert len(p.lines()) == len(recorded)


def test_plan_follows_explicit_settings() -> None:
    cfg = cfg_for(
        "lora", "ddp", "training.precision=fp32", "model.dtype=bfloat16",
        "training.chunked_loss=false", "training.fused_lora=false", "training.optim=sgd",
    )
    p = RunPlan.build(cfg, TWO, BF16_GPU)
    assert (p.precision, p.weight_dtype, p.autocast) == ("fp32", "bfloat16", False)
    assert (p.chunked_loss, p.fused_lora, p.optim) == (False, False, "sgd")
    assert p.reasons["weight_dtype"] == "model.dtype=bfloat16"
    assert p.reasons["chunked_loss"] == "training.chunked_loss=false"


def test_attention_is_chosen_once_with_its_reason() -> None:
    llama = None  # a Llama-style decoder: all three
    flash = Hardware.gpu_node(flash_attn=True)
    assert plan.choose_attention("auto", llama, flash)[0] == "flash_attention_2"
    # Each machine that cannot run flash-attn 2 says why; where the image would, says so.
    for hw, why in [
        (BF16_GPU, "auto: flash_attn does not import in this environment (in the llmtrain "
                   "image on an A100 or later: flash_attention_2)"),
        (CPU, "auto: the target has no CUDA GPU (in the llmtrain image on an A100 or later: "
              "flash_attention_2)"),
        (Hardware.gpu_node(flash_attn=True, bf16=False),
         "auto: the GPU is older than compute capability 8.0 (V100, T4; on ROCm, older than "
         "MI200), which flash-attn 2 needs"),
    ]:
        assert plan.choose_attention("auto", llama, hw) == ("sdpa", why)
    neox = {"flash_attention_2": True, "sdpa": False, "eager": True}  # no SDPA in 4.37.2
    assert plan.choose_attention("auto", neox, BF16_GPU, model_type="gpt_neox") == (
        "eager", "auto: gpt_neox has neither flash_attention_2 nor sdpa")
    with pytest.raises(ConfigError, match="not supported for gpt_neox"):
        plan.choose_attention("sdpa", neox, flash, model_type="gpt_neox")
    with pytest.raises(ConfigError, match=r"flash_attention_2 cannot run on the target: the "
                       r"GPU is older than compute capability 8\.0 \(V100, T4;"):
        plan.choose_attention("flash_attention_2", llama, FP16_GPU)


def test_a_gpu_without_bf16_trains_in_fp16_and_refuses_bf16() -> None:
    """A V100 or T4 (FP16_GPU): auto is fp16, and an explicit bf16 is refused (exit 64) where
    torch would emulate it in fp32, not trained many times slower."""
    p = RunPlan.build(cfg_for("lora", "auto"), ONE, FP16_GPU)
    assert (p.precision, p.reasons["precision"]) == ("fp16", "auto: the GPU has no bf16")
    assert p.attention == "sdpa"
    for override in ("training.precision=bf16", "training.param_dtype=bfloat16"):
        cfg = cfg_for("full" if "param" in override else "lora", "auto", override)
        with pytest.raises(NeedsGpuError, match="without bf16") as caught:
            RunPlan.build(cfg, ONE, FP16_GPU)
        assert caught.value.exit_code == 64
    assert RunPlan.build(cfg_for("lora", "auto", "training.precision=bf16"), ONE, BF16_GPU)
    # every bf16 setting named at once, not one refusal per round
    every = cfg_for(
        "full", "fsdp", "training.precision=bf16", "training.param_dtype=bfloat16",
        "model.dtype=bfloat16", "distributed.reduce_dtype=bf16",
    )
    with pytest.raises(NeedsGpuError) as caught:
        RunPlan.build(every, TWO, FP16_GPU)
    assert caught.value.problem.startswith(
        "training.precision=bf16, training.param_dtype=bfloat16, model.dtype=bfloat16, "
        "distributed.reduce_dtype=bf16 on a GPU without bf16"
    )


def test_fp16_training_keeps_trained_weights_out_of_fp16() -> None:
    """On a V100 (fp16 with loss scaling) model.dtype=float16 for trained full weights is
    refused (exit 64): the Trainer's GradScaler raises "Attempting to unscale FP16 gradients"
    at the first optimizer step. Adapters (fp32) and DeepSpeed (its own fp16 optimizer) are
    fine, and so is an explicit fp16 with fp32 weights."""
    for method in ("full", "layers"):
        with pytest.raises(ConfigError, match=r"model\.dtype=float16 with method") as caught:
            RunPlan.build(cfg_for(method, "auto", "model.dtype=float16"), ONE, FP16_GPU)
        assert caught.value.exit_code == 64
    with pytest.raises(ConfigError, match="refuses fp16 gradients"):
        RunPlan.build(
            cfg_for("full", "auto", "model.dtype=float16", "training.precision=fp16"),
            ONE,
            BF16_GPU,
        )
    assert RunPlan.build(cfg_for("lora", "auto", "model.dtype=float16"), ONE, FP16_GPU)
    assert RunPlan.build(cfg_for("full", "zero2", "model.dtype=float16"), TWO, FP16_GPU)
    assert RunPlan.build(cfg_for("full", "auto"), ONE, FP16_GPU).weight_dtype == "float32"


def test_a_node_without_bf16_gets_no_flash_attn() -> None:
    """Hardware.gpu_node and the V100 preset: flash-attn 2 needs compute capability 8.0, so a
    node without bf16 never plans flash_attention_2, even where flash_attn imports."""
    assert Hardware.gpu_node(flash_attn=True).flash_attn
    assert not Hardware.gpu_node(flash_attn=True, bf16=False).flash_attn
    v100, h100 = get_gpu("v100").node(), get_gpu("h100").node()
    assert (v100.cuda, v100.bf16, v100.flash_attn) == (True, False, False)
    assert (h100.cuda, h100.bf16) == (True, True)


def test_the_estimate_for_a_v100_is_that_gpus_plan() -> None:
    """estimate/validate --gpu v100: fp16, no flash-attn, and whole rows in 16 bits keep k
    and v repeated to every query head (no grouped-query kernel before compute capability
    8.0), where an H100's keep them unrepeated."""
    cfg = cfg_for("lora", "auto", "training.compile=true")
    shape = ModelShape.from_config(tiny_config("llama").to_dict())
    v100, h100 = get_gpu("v100"), get_gpu("h100")
    assert (target_plan(cfg, gpu=v100).precision, target_plan(cfg, gpu=h100).precision) == (
        "fp16", "bf16")
    runs = [
        replace(run_shape(cfg, shape, gpu=g), attention_forward="rows") for g in (v100, h100)
    ]
    assert [r.grouped_query_kernel for r in runs] == [False, True]
    assert [r.dtype_bytes for r in runs] == [2, 2]
    v100_bytes, h100_bytes = (memory._attn_bytes(shape, r) for r in runs)
    assert v100_bytes - h100_bytes == 2 * 2 * (shape.hidden - shape.kv_dim) > 0


def test_estimate_refuses_flash_attention_on_a_gpu_that_cannot_run_it() -> None:
    """estimate --attention is a what-if (flash_attn need not import on the login node), but a
    V100 runs no flash-attn 2 at all: exit 64 with the reason, where an H100 is estimated."""
    from llmtrain.verbs import estimate

    cfg = load_config(REPO / "configs" / "lora.yaml")
    for gpu, refused in (("v100", True), ("h100", False)):
        args = argparse.Namespace(nodes=1, gpus_per_node=1, gpu=gpu,
                                  attention="flash_attention_2", tokens=None, mfu=0.4)
        if refused:
            with pytest.raises(ConfigError, match=re.escape(
                    "cannot run on a V100 32 GB: flash-attn 2 needs compute capability 8.0")
            ) as err:
                estimate.report(cfg, args)
            assert err.value.exit_code == 64
        else:
            assert estimate.report(cfg, args)["run"]["attention"] == "flash_attention_2"


@pytest.mark.parametrize("overrides", [[], ["training.compile=true"]])
def test_estimate_judges_each_gpu_column_with_that_gpus_plan(overrides: list[str]) -> None:
    """estimate's `fits` per preset: each column's run is the one that GPU's plan makes (a
    V100's fp16 and SDPA, k and v repeated), not --gpu's; a GPU whose plan refuses the config
    (bf16 asked for on a V100) fits nothing."""
    from llmtrain.verbs import estimate

    cfg = load_config(REPO / "configs" / "full.yaml", overrides)
    args = argparse.Namespace(nodes=1, gpus_per_node=1, gpu="h100", attention=None,
                              tokens=None, mfu=0.4)
    rep = estimate.report(cfg, args)
    shape = model_shape(cfg)
    v100 = get_gpu("v100")
    base, v100_plan = run_shape(cfg, shape, gpu=v100), target_plan(cfg, gpu=v100)
    for r in rep["grid"]:
        there = replace(
            base, method=r["method"], strategy=r["strategy"],
            gradient_checkpointing=r["gradient_checkpointing"],
            weight_bytes=weight_bytes(cfg, v100_plan,
                                      "lora" if r["method"] == "inference" else r["method"]),
        )  # fmt: skip
        assert r["fits"]["v100-32gb"] == (
            memory.estimate(shape, there).total <= v100.memory_bytes
        )
    bf16 = estimate.report(load_config(REPO / "configs" / "full.yaml",
                                       [*overrides, "training.precision=bf16"]), args)
    assert not any(r["fits"]["v100-32gb"] for r in bf16["grid"])
    assert any(r["fits"]["h100-80gb"] for r in bf16["grid"])


def test_the_estimator_reads_the_plan() -> None:
    """RunShape's strategy, dtypes, autocast, attention and optimizer are the plan's, for
    every validated pair (there is no second copy of the policy to drift)."""
    shape = ModelShape.from_config(tiny_config("llama").to_dict())
    for method, strategies in plan.VALIDATED.items():
        for strategy in strategies:
            cfg = cfg_for(method, "auto" if strategy == "single" else strategy)
            gpus = 1 if strategy == "single" else 2
            p = target_plan(cfg, gpus_per_node=gpus)
            assert p.strategy == strategy
            run = run_shape(cfg, shape, gpus_per_node=gpus, plan=p)
            assert run.strategy == ("ddp" if strategy == "single" else strategy)
            assert run.autocast == p.autocast, (method, strategy)
            assert run.wbytes == (4 if p.weight_dtype == "float32" else 2)
            assert run.mixed_precision == (p.precision != "fp32")
            assert run.attention == p.attention
            assert run.fused_adam == (p.optim == "adamw_torch_fused")
            assert plan.fused_lora_applies(run.fused_lora, run.method, run.strategy) == (
                p.fused_lora), (method, strategy)


def test_estimate_reports_the_plan_and_only_allowed_pairs() -> None:
    from llmtrain.verbs import estimate

    args = argparse.Namespace(
        nodes=1, gpus_per_node=4, gpu="h100", attention=None, tokens=None, mfu=0.4
    )
    rep = estimate.report(load_config(REPO / "configs" / "qlora.yaml"), args)
    assert rep["plan"]["strategy"] == {"value": "ddp", "reason": "auto: 4 processes"}
    assert rep["plan"]["quantized"]["value"] is True
    pairs = {(r["method"], r["strategy"]) for r in rep["grid"] if r["method"] != "inference"}
    assert ("qlora", "ddp") in pairs
    for method, strategy in pairs:
        assert plan.refusal(method, strategy) is None, (method, strategy)


@pytest.mark.parametrize(
    ("overrides", "unit"),
    [
        ([], "samples per GPU (training.per_device_train_batch_size)"),
        (
            ["data.packing=padding_free", "training.tokens_per_batch=4096"],
            "tokens per GPU (training.tokens_per_batch)",
        ),
    ],
)
def test_estimate_gives_the_largest_micro_batch_with_its_unit(
    overrides: list[str], unit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """In samples, or in tokens under a token budget (what training.tokens_per_batch sets)."""
    from llmtrain.verbs import estimate

    args = argparse.Namespace(
        nodes=1, gpus_per_node=1, gpu="h100", attention=None, tokens=None, mfu=0.4
    )
    rep = estimate.report(load_config(REPO / "configs" / "demo.yaml", overrides), args)
    estimate._print_table(rep)
    line = next(x for x in capsys.readouterr().out.splitlines() if "largest micro-batch" in x)
    largest, run = rep["this_run"]["largest_micro_batch"], rep["run"]
    shown = -(-run["batch_tokens"] * largest // run["micro_batch"]) if overrides else largest
    assert largest > 0 and line.endswith(f": {shown} {unit}")
    if overrides:  # the budget's micro-batch: 4096 tokens or fewer, so the largest is larger
        assert 0 < run["batch_tokens"] <= 4096 < shown


def test_estimate_writes_parameter_counts_as_people_do() -> None:
    from llmtrain.verbs.estimate import parameters

    assert [parameters(n) for n in (6_738_415_616, 134_515_008, 325_184)] == [
        "6.74B", "135M", "0.325M",
    ]  # fmt: skip
    # what rounds to a thousand millions is 1.00B, not "1e+03M"
    assert [parameters(n) for n in (999_499_999, 999_500_000, 999_999_999)] == [
        "999M", "1.00B", "1.00B",
    ]  # fmt: skip


def test_plan_and_estimator_import_without_torch() -> None:
    code = (
        "import sys, llmtrain.plan, llmtrain.sizing.from_config, llmtrain.verbs.estimate; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_world_reads_the_stop_settings_once(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LLMTRAIN_STOP_FILE", "LLMTRAIN_DEADLINE", "LLMTRAIN_DEADLINE_MARGIN",
                 "LLMTRAIN_STOP_CHECK_STEPS"):
        monkeypatch.delenv(name, raising=False)
    quiet = World.from_env()
    assert (quiet.stop_file, quiet.deadline, quiet.deadline_margin_s, quiet.stop_check_steps) == (
        None, None, 300.0, 1)
    monkeypatch.setenv("LLMTRAIN_STOP_FILE", "/run/STOP")
    monkeypatch.setenv("LLMTRAIN_DEADLINE", "1800000000")
    monkeypatch.setenv("LLMTRAIN_DEADLINE_MARGIN", "120")
    monkeypatch.setenv("LLMTRAIN_STOP_CHECK_STEPS", "5")
    monkeypatch.setenv("WORLD_SIZE", "4")
    job = World.from_env()
    assert (job.stop_file, job.deadline, job.deadline_margin_s, job.stop_check_steps) == (
        "/run/STOP", 1800000000.0, 120.0, 5)
    assert job.world_size == 4 and job.distributed


@pytest.mark.parametrize(
    ("config", "overrides", "expected"),
    [
        ("configs/full.yaml", ["lora.dropout=0", "lora.r=8"], "lora.dropout, lora.r set, but "
         "method.name=full trains no adapter: ignored"),
        ("configs/layers.yaml", ["lora.target_modules=[q_proj]"], "lora.target_modules set, "
         "but method.name=layers trains no adapter"),
        ("configs/dpo.yaml", ["preference.weights=full"], "lora.alpha, lora.dropout, lora.r "
         "set, but method.name=dpo with preference.weights=full trains no adapter"),
        ("configs/full.yaml", [], None),
        ("configs/full.yaml", ["lora={}"], None),  # an empty section sets nothing
        ("configs/lora.yaml", ["lora.r=8"], None),
        ("configs/dpo.yaml", [], None),  # preference.weights=lora trains an adapter
    ],
)
def test_lora_keys_a_run_without_an_adapter_ignores_are_named(
    config: str, overrides: list[str], expected: str | None
) -> None:
    """lora.* keys that change nothing (the run trains no adapter) are named, as validate's and
    finetune's warning, through run_checks; the config still runs."""
    from llmtrain.train.checks import ignored_lora_keys, run_checks

    cfg = load_config(REPO / config, overrides)
    warnings = ignored_lora_keys(cfg)
    if expected is None:
        assert warnings == []
        return
    assert len(warnings) == 1 and warnings[0].startswith(expected), warnings
    if config != "configs/dpo.yaml":  # the embedded model: every check on this CPU, quickly
        cfg = load_config(REPO / config, [*overrides, "model.path=embedded:tiny-llama"])
        checked = run_checks(cfg, target=Hardware.cpu(), trains_here=True, data=False)
        assert ignored_lora_keys(cfg)[0] in checked.warnings
