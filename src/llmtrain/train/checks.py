"""The one check list run before anything is written or any GPU is allocated: config, output
directories, model and tokenizer, the method against the model's modules, data rows, templates,
hardware. `validate` runs it on a login node; `finetune` and `prepare` run the same function
at start, so the three verbs fail on the same input with the same exit code and words."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtrain import compat, plan, stack
from llmtrain.config import PREFERENCE_METHODS, RunConfig
from llmtrain.data import mixture, preference
from llmtrain.data.rows import check_templates, load_rows
from llmtrain.data.token_budget import row_lengths
from llmtrain.data.tokenize import check_rows, tokenize
from llmtrain.errors import ConfigError, NeedsGpuError
from llmtrain.model.load import load_model_config, load_tokenizer, model_class, pick_attention
from llmtrain.train import checkpoints
from llmtrain.train import preference as preference_training
from llmtrain.vocab import special_tokens

log = logging.getLogger(__name__)
SAMPLE_ROWS = 2000


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens per sampled sample (check_data)


def needs_gpu(cfg: RunConfig) -> bool:
    """Whether the run can only train on a CUDA GPU (then a login node validates for one)."""
    return (
        cfg.method.name == "qlora"
        or cfg.training.precision in ("bf16", "fp16")
        or cfg.training.param_dtype == "bfloat16"
        or cfg.model.attn_implementation == "flash_attention_2"
        or _needs_cuda(cfg.distributed.strategy)
    )


def _needs_cuda(strategy: str) -> bool:
    return strategy != "auto" and plan.STRATEGIES[strategy].needs_cuda


def check_hardware(cfg: RunConfig, *, gpu: bool) -> None:
    """GPU-only settings against a target machine that has (`gpu`) or lacks a CUDA GPU.

    Raises:
        NeedsGpuError: a GPU-only setting for a target without one (exit 64).
        ConfigError: a method/strategy combination the pinned stack cannot run (plan.check)
            (exit 64).
    """
    if cfg.method.name == "qlora" and not gpu:
        raise NeedsGpuError(
            "method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels) and this machine has none",
            "run on a GPU node, or use method lora on CPU",
        )
    if cfg.training.precision in ("bf16", "fp16") and not gpu:
        raise NeedsGpuError(
            f"training.precision={cfg.training.precision} needs a CUDA GPU and this machine "
            "has none",
            "use training.precision=auto (fp32 on CPU) or run on a GPU node",
        )
    if cfg.training.param_dtype == "bfloat16" and not gpu:
        raise NeedsGpuError(
            "training.param_dtype=bfloat16 needs a bf16 CUDA GPU and this machine has none",
            "remove training.param_dtype on CPU, or run on a GPU node",
        )
    plan.check(cfg)
    if _needs_cuda(cfg.distributed.strategy) and not gpu:
        raise NeedsGpuError(
            f"distributed.strategy={cfg.distributed.strategy} needs CUDA GPUs: accelerate 0.26 "
            "starts DeepSpeed with NCCL only, and this machine has none",
            "run on GPU nodes; on CPU use distributed.strategy=ddp or fsdp (gloo)",
        )
    if cfg.distributed.strategy == "fsdp" and not gpu:
        log.warning("distributed.strategy=fsdp on CPU runs over gloo, with two processes or more")


# training.optim values transformers 4.37.2's Trainer builds from another package, imported only
# when it creates the optimizer (after the model and data are loaded).
BITSANDBYTES_OPTIMIZERS = (
    "adamw_bnb_8bit", "adamw_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_lion_32bit", "paged_lion_8bit",
)  # fmt: skip
OPTIMIZER_PACKAGES = {
    **dict.fromkeys(BITSANDBYTES_OPTIMIZERS, "bitsandbytes"),
    "adamw_apex_fused": "apex",
    "adamw_anyprecision": "torchdistx",
}


def packages_needed(cfg: RunConfig) -> list[tuple[str, str]]:
    """(setting, package) for each optional package a setting makes training import."""
    needed = []
    strategy = cfg.distributed.strategy
    if strategy != "auto" and plan.STRATEGIES[strategy].deepspeed_json is not None:
        needed.append((f"distributed.strategy={strategy}", "deepspeed"))
    if cfg.method.name == "qlora":
        needed.append(("method qlora", "bitsandbytes"))
    optimizer_package = OPTIMIZER_PACKAGES.get(cfg.training.optim)
    if optimizer_package is not None:
        needed.append((f"training.optim={cfg.training.optim}", optimizer_package))
    return needed


def _unusable(package: str) -> str | None:
    """Why `package` cannot be used here, None if it can. bitsandbytes is imported (an
    installed one can fail to import: compat.skip_unusable_bitsandbytes); the others are looked
    up, as accelerate and transformers look them up before they import them."""
    if importlib.util.find_spec(package) is None:
        return "is not installed in this Python environment"
    why = compat.bitsandbytes_import_error() if package == "bitsandbytes" else None
    return None if why is None else f"is installed but cannot be imported ({why})"


def check_packages(cfg: RunConfig, *, trains_here: bool) -> list[str]:
    """The optional packages the settings need (packages_needed) against this Python
    environment. A missing one would crash the job after the model and data were loaded, and
    Slurm would requeue the crash. Where the run trains (`trains_here`: finetune, or validate
    on the GPU machine itself) that is refused; elsewhere (a login node checking for a GPU
    node, prepare) the training environment may differ: the warnings returned say so.

    Raises:
        ConfigError: a needed package that cannot be used, where the run trains (exit 64).
    """
    problems = [f"{setting} needs {package}, which {why}"
                for setting, package in packages_needed(cfg)
                if (why := _unusable(package)) is not None]  # fmt: skip
    if not problems:
        return []
    fix = (
        "run llmtrain inside the llmtrain image (make image or make sif: it has deepspeed and "
        "bitsandbytes), or install the package in this environment"
    )
    if trains_here:
        raise ConfigError("; ".join(problems), fix)
    return [f"{problem}: the environment that trains must have it ({fix})" for problem in problems]


def check_writable(key: str, path: Path) -> None:
    """`path` is a directory already, or one this user can create.

    Raises:
        ConfigError: it is a file, lies below a file, or its nearest existing parent is not
            writable (exit 64).
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"{key} {str(path)!r} is an existing file, not a directory",
            f"point {key} at a new or existing directory, or move the file away",
        )
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(
            f"{key} {str(path)!r} cannot be created: {str(parent)!r} is a file",
            f"point {key} at a directory path that has no file in it",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{key} {str(path)!r} cannot be written: this user may not write to {str(parent)!r}",
            f"point {key} at a directory you can write to (e.g. on scratch)",
        )


def check_outputs(cfg: RunConfig) -> None:
    """The directories finetune and prepare write, and the checkpoint to resume from."""
    out = Path(cfg.output.dir)
    check_writable("output.dir", out)
    if cfg.data.prepared_dir is not None:
        check_writable("data.prepared_dir", Path(cfg.data.prepared_dir))
    else:
        check_writable("output.dir", cfg.prepared_dir())
    if cfg.output.resume not in ("auto", "never"):
        checkpoints.resume_point(out, cfg.output.resume)


def check_model(
    cfg: RunConfig, *, target: plan.Hardware | None = None
) -> tuple[Any, Any, list[str]]:
    """The model's config and tokenizer (no weights); `target`: the machine checked for, None:
    this one.

    Raises:
        ConfigError: the model cannot be read, its type has no causal-LM class in transformers
            4.37.2, or the tokenizer has more tokens than the model's vocab_size (exit 64)."""
    config = load_model_config(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    lines = [f"model: {config.model_type}, {getattr(config, 'num_hidden_layers', '?')} layers"]
    if model_class(config) is None:
        raise ConfigError(
            f"model type {config.model_type!r} has no causal-LM class in transformers "
            f"{stack.transformers_version()}",
            "use a decoder-only model, or model.trust_remote_code=true for custom code",
        )
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}",
            "use the model's own tokenizer, or resize the model (llmtrain vocab init)",
        )
    lines.append(f"attention: {pick_attention(cfg.model, config, target=target)}")
    return config, tokenizer, lines


def check_method(cfg: RunConfig, config: Any) -> None:
    """lora.target_modules, lora.target_parameters and method.layers against the model's names,
    from a model built on the meta device (no weights, no memory), with the functions finetune
    wraps with.

    Raises:
        ConfigError: a target or layer pattern names nothing in the model (exit 64).
    """
    if cfg.method.name == "full":
        return
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from llmtrain.model.methods import (
        check_dora_targets,
        lora_target_parameters,
        lora_targets,
        select_parameters,
    )

    with init_empty_weights(include_buffers=True):
        model = AutoModelForCausalLM.from_config(
            config, trust_remote_code=cfg.model.trust_remote_code
        )
    if cfg.method.name == "layers":
        select_parameters(model, cfg.method.layers)
        return
    targets = lora_targets(config, cfg.lora, model)
    if cfg.method.name == "lora" and cfg.lora.use_dora:
        check_dora_targets(model, targets)
    lora_target_parameters(cfg.lora, model, targets)


def check_data(cfg: RunConfig, tokenizer: Any, report: Report) -> None:
    """Each source's rows load, the templates fit them, data.eval_fraction leaves rows on both
    sides, and a sample tokenizes to usable samples."""
    pairs = cfg.method.name in PREFERENCE_METHODS
    for k, section in enumerate(cfg.data.for_sources()):
        rows = load_rows(section)
        if pairs:
            preference.check_columns(section, rows.column_names)
        if not (pairs and section.shape == "chat"):  # pairs name their own turn columns
            check_templates(section, rows)
        if cfg.data.eval_fraction > 0 and mixture.splits_rows(section):
            mixture.check_eval_split(cfg.data, k, mixture.distinct_rows(rows, section))
        name = f"data.sources[{k}]" if cfg.data.sources else "data"
        if len(rows) > SAMPLE_ROWS:
            # Every row rendered and checked, without tokenizing, as prepare would: a bad row
            # after the sample, and the count of all rows that data.special_tokens_in_text
            # refuses or drops.
            check = preference.check_pair_rows if pairs else check_rows
            _, dropped = check(rows, tokenizer, section)
            if dropped:
                report.lines.append(
                    f"{name} (all {len(rows)} rows): {dropped} dropped holding a special "
                    "token's text"
                )
        sample = rows.select(range(min(SAMPLE_ROWS, len(rows))))
        if pairs:
            _, stats = preference.tokenize_pairs(sample, tokenizer, section)
        else:
            tokenized, stats = tokenize(sample, tokenizer, section)
            report.lengths += row_lengths(tokenized).tolist()
        scope = "all" if len(sample) == len(rows) else f"first {len(sample)} of {len(rows)}"
        report.lines.append(f"{name} ({scope} rows): {stats.summary()}")
        too_long = stats.truncated + stats.dropped_too_long + stats.dropped_prompt_too_long
        if too_long:
            report.warnings.append(
                f"{name}: {too_long} of {stats.rows} sampled rows exceed "
                f"data.max_length={section.max_length} (policy: {section.overflow})"
            )


def run_checks(
    cfg: RunConfig, *, target: plan.Hardware, trains_here: bool, data: bool = True
) -> Report:
    """Every check, in the order finetune would hit them; raises the first problem found.

    Args:
        target: the machine the run is checked for (validate: the GPU node it checks for, or
            this one; finetune: this machine, device.this_machine).
        trains_here: the run trains in this Python environment (finetune; validate on the
            machine it checks for), so a missing optional package is refused, not warned of
            (check_packages).
        data: also read the data (finetune: only the main rank, so N ranks do not read the
            whole dataset at once).

    Raises:
        ConfigError: exit 64. DataError: exit 65.
    """
    report = Report(warnings=ignored_lora_keys(cfg))
    preference_training.check(cfg)
    # dpo and orpo train LoRA or full weights: the checks of that method hold for them.
    policy = preference_training.policy_config(cfg)
    check_hardware(policy, gpu=target.cuda)
    report.warnings += check_packages(policy, trains_here=trains_here)
    check_outputs(cfg)
    config, tokenizer, lines = check_model(cfg, target=target)
    report.lines += lines
    check_method(policy, config)
    report.warnings += token_warnings(cfg, config, tokenizer)
    if data:
        check_data(cfg, tokenizer, report)
    return report


def ignored_lora_keys(cfg: RunConfig) -> list[str]:
    """A warning when the config sets lora.* keys and the run trains no adapter (method full
    or layers, or dpo/orpo with preference.weights=full): those keys change nothing. A warning,
    not an error (unlike method.layers without method layers): one list of overrides shared by
    runs of several methods is common practice, and harmless."""
    keys = sorted(cfg.lora.model_fields_set)
    method = plan.trained_method(cfg)
    if not keys or method in plan.ADAPTER_METHODS:
        return []
    runs = (
        f"method.name={cfg.method.name} with preference.weights={method}"
        if cfg.method.name != method
        else f"method.name={method}"
    )
    return [
        f"{', '.join('lora.' + k for k in keys)} set, but {runs} trains no adapter: ignored "
        "(for an adapter use method.name=lora, or preference.weights=lora)"
    ]


def token_warnings(cfg: RunConfig, config: Any, tokenizer: Any) -> list[str]:
    """Where the model would stop at another token than the trained EOS (every saved output
    gets the trained one), and an instruct model's chat template left unused by the data."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(cfg.model.resolved_path())
    except OSError:  # no generation_config.json: transformers derives one from config.json
        generation = None
    warnings = special_tokens.config_warnings(special_tokens.decide(tokenizer), config, generation)
    unused = [s.path for s in cfg.data.for_sources() if s.shape != "chat"]
    if getattr(tokenizer, "chat_template", None) and unused:
        warnings.append(
            f"the model has a chat template (an instruct model), but {', '.join(map(str, unused))} "
            "is rendered with data.prompt_template/data.shape=text instead; to fine-tune it the "
            "way it chats, use data.shape=chat (configs/chat.yaml)"
        )
    return warnings
