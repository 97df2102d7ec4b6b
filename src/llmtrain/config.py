"""The run config: one YAML file behind one typed schema, with dotted command-line overrides.

Unknown keys are errors, and every problem is reported at once with the key to change.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmtrain.errors import ConfigError

log = logging.getLogger(__name__)
EMBEDDED_PREFIX = "embedded:"
Reporter = Literal["tensorboard", "wandb", "mlflow", "none"]
# The modules transformers' integration of each reporter imports (any one of them will do).
REPORTER_MODULES: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
}


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_path(value: str) -> str:
    """`embedded:NAME` points into the package's shipped assets; anything else is returned as is."""
    if value.startswith(EMBEDDED_PREFIX):
        return str(resources.files("llmtrain") / "embedded" / value[len(EMBEDDED_PREFIX) :])
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    path: str = Field(description="local directory, hub id, or embedded:NAME")
    revision: str | None = None
    tokenizer: str | None = Field(None, description="tokenizer path if not the model's")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    trust_remote_code: bool = False
    eos_token: str | None = Field(
        None, description="end-of-sequence token to train and stop at, if not the tokenizer's"
    )
    pad_token: str | None = Field(None, description="padding token, if not the tokenizer's")

    def resolved_path(self) -> str:
        return resolve_path(self.path)

    def resolved_tokenizer(self) -> str:
        return resolve_path(self.tokenizer or self.path)


DataFormat = Literal["auto", "json", "jsonl", "csv", "parquet", "text", "squad", "disk", "hub"]
# The keys a source of a mixture may set; the others (max_length, packing, eval_fraction,
# chat_template, ...) hold for the whole run.
SOURCE_KEYS = (
    "path", "format", "name", "split", "shape", "prompt_template", "response_template",
    "text_field", "messages_field", "system_prompt", "train_on", "limit", "field",
    "special_tokens_in_text",
)


class SourceSection(Section):
    """One dataset of a mixture; unset keys take the value of the `data` section."""

    path: str = Field(description="file, save_to_disk directory, hub dataset, or embedded:NAME")
    format: DataFormat | None = None
    name: str | None = None
    field: str | None = None
    split: str | None = None
    shape: Literal["instruction", "text", "chat"] | None = None
    prompt_template: str | None = None
    response_template: str | None = None
    text_field: str | None = None
    messages_field: str | None = None
    system_prompt: str | None = None
    train_on: Literal["assistant", "last_assistant", "all"] | None = None
    special_tokens_in_text: Literal["refuse", "drop", "keep"] | None = None
    limit: int | None = Field(None, ge=1)
    rows: int | None = Field(
        None, ge=1, description="training rows taken from this source (repeated when more)"
    )
    weight: float | None = Field(
        None, gt=0, description="training rows taken as a multiple of the source's rows"
    )

    @model_validator(mode="after")
    def _one_amount(self) -> SourceSection:
        if self.rows is not None and self.weight is not None:
            raise ValueError("a data source takes rows or weight, not both")
        return self


class DataSection(Section):
    path: str | None = Field(
        None, description="file, save_to_disk directory, hub dataset, or embedded:NAME"
    )
    sources: list[SourceSection] = Field(
        default_factory=list,
        description="several datasets mixed (instead of path), each with its own keys",
    )
    format: Literal["auto", "json", "jsonl", "csv", "parquet", "text", "squad", "disk", "hub"] = (
        "auto"
    )
    name: str | None = Field(None, description="hub dataset configuration name")
    field: str | None = Field(
        None, description="JSON whose top level is an object: the key that holds the rows"
    )
    split: str = "train"
    shape: Literal["instruction", "text", "chat"] = "instruction"
    prompt_template: str | None = None
    response_template: str | None = None
    text_field: str = "text"
    messages_field: str | None = Field(
        None, description="chat: the column of turns; default 'messages', else 'conversations'"
    )
    chat_template: str = Field(
        "auto",
        description="chat: 'auto' (the tokenizer's own), chatml, llama-2, mistral, alpaca, "
        "or a Jinja template",
    )
    system_prompt: str | None = Field(
        None, description="chat: system message for conversations that have none"
    )
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        "assistant", description="chat: which turns carry the loss"
    )
    special_tokens_in_text: Literal["refuse", "drop", "keep"] = Field(
        "refuse",
        description="data whose text holds a special token's text (</s>, <|im_end|>): refuse "
        "(exit 65), drop the row (counted), or keep (read as that control token)",
    )
    max_length: int = Field(512, ge=8)
    overflow: Literal["truncate", "drop"] = "truncate"
    packing: Literal["none", "blocks", "padding_free"] = "none"
    limit: int | None = Field(None, ge=1, description="use only the first N rows")
    eval_fraction: float = Field(0.0, ge=0.0, lt=0.5)
    prepared_dir: str | None = Field(None, description="default: <output.dir>/prepared")

    def resolved_path(self) -> str:
        if self.path is None:
            raise ValueError("a mixture (data.sources) has no single path: use for_sources()")
        return resolve_path(self.path)

    def for_sources(self) -> list[DataSection]:
        """One DataSection per dataset: this one, or each source over this one's values."""
        if not self.sources:
            return [self]
        out = []
        for src in self.sources:
            given = src.model_dump(include=set(SOURCE_KEYS), exclude_none=True)
            out.append(self.model_copy(update={**given, "sources": []}))
        return out

    @model_validator(mode="after")
    def _path_or_sources(self) -> DataSection:
        if self.path is not None and self.sources:
            raise ValueError(
                "data takes data.path (one dataset) or data.sources (a list), not both"
            )
        if self.path is None and not self.sources:
            raise ValueError("data needs data.path (one dataset) or data.sources (a list)")
        if not self.sources:
            self.check_shape()
        for k, section in enumerate(self.for_sources() if self.sources else []):
            try:
                section.check_shape()
            except ValueError as exc:
                raise ValueError(f"data.sources[{k}]: {exc}") from None
        return self

    def check_shape(self) -> None:
        """Raises: ValueError when the shape's keys are missing or packing does not fit it."""
        if self.shape == "instruction" and not (self.prompt_template and self.response_template):
            raise ValueError(
                "instruction data needs data.prompt_template and data.response_template "
                "(for example 'Question: {question}\\nAnswer: ' and '{answer}'); "
                "for plain text set data.shape=text"
            )
        if self.packing == "blocks" and self.shape != "text":
            raise ValueError("data.packing=blocks is for data.shape=text; use padding_free")
        if self.packing == "padding_free" and self.shape == "text":
            raise ValueError(
                "data.packing=padding_free is for data.shape=instruction or chat; "
                "plain text packs with data.packing=blocks"
            )


# Preference tuning on (prompt, chosen, rejected) pairs: train/preference.py.
PREFERENCE_METHODS = ("dpo", "orpo")


class MethodSection(Section):
    name: Literal["full", "layers", "lora", "qlora", "dpo", "orpo"] = "lora"
    layers: list[str] = Field(
        default_factory=list,
        description="for name=layers: 'last:N', 'embeddings', 'lm_head' or parameter-name globs",
    )

    @model_validator(mode="after")
    def _layers_given(self) -> MethodSection:
        if self.name == "layers" and not self.layers:
            raise ValueError(
                "method.name=layers needs method.layers, e.g. ['last:2', 'lm_head'] "
                "or parameter-name globs like 'model.layers.11.*'"
            )
        if self.name != "layers" and self.layers:
            raise ValueError("method.layers is only used with method.name=layers")
        return self


class LoraSection(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: Literal["auto"] | list[str] = "auto"
    target_parameters: list[str] = Field(
        default_factory=list,
        description="parameters LoRA adapts directly (peft's target_parameters, the current "
        "stack): a mixture of experts' fused 3-D expert weights, e.g. "
        "[mlp.experts.gate_up_proj, mlp.experts.down_proj]; needs lora.dropout=0",
    )
    modules_to_save: list[str] = Field(default_factory=list)
    use_rslora: bool = Field(
        False, description="rank-stabilized LoRA: adapter scaling alpha/sqrt(r) instead of alpha/r"
    )
    use_dora: bool = Field(
        False,
        description="DoRA: LoRA as the direction plus a trained magnitude per output feature "
        "(method lora on nn.Linear layers; not with fsdp or zero3)",
    )
    init_lora_weights: bool | Literal["gaussian"] = Field(
        True,
        description="true: A Kaiming-uniform, B zero; gaussian: A normal with std 1/r, B zero; "
        "false: both random (the model no longer starts as the base model)",
    )

    @field_validator("init_lora_weights", mode="before")
    @classmethod
    def _init_choice(cls, value: Any) -> Any:
        # One message for the one key, not one per member of the union.
        if isinstance(value, bool) or value == "gaussian":
            return value
        if value == "loftq":
            # peft 0.9.0's LoftQ rewrites the base weights in memory (quantized, dequantized);
            # llmtrain saves only the adapter, so merge and generate would pair it with the
            # original base. It also needs scipy, which the image does not ship.
            raise ValueError(
                "loftq is not supported: peft 0.9.0's LoftQ replaces the base weights in memory, "
                "and llmtrain saves only the adapter, so merge and generate would load it onto "
                "the original base; use true or gaussian (with method qlora, plain QLoRA)"
            )
        raise ValueError(f"{value!r} is not one of true, false, gaussian")


class PreferenceSection(Section):
    """method.name dpo or orpo: which weights train and the loss's constants (TRL 0.8.6's)."""

    weights: Literal["lora", "full"] = Field(
        "lora",
        description="lora: an adapter, the base model with the adapter disabled is DPO's "
        "reference (no second copy); full: every weight, with a frozen reference copy",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="dpo: the KL strength (the temperature of the reward margin); orpo: the "
        "weight lambda of the odds-ratio term",
    )
    loss_type: Literal["sigmoid", "hinge", "ipo"] = Field(
        "sigmoid",
        description="dpo: sigmoid (the DPO paper), hinge (SLiC), ipo (IPO); TRL's names",
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="dpo sigmoid: the assumed share of flipped pairs (cDPO)"
    )


class TrainingSection(Section):
    """Fields map one to one onto transformers.TrainingArguments; `args` passes the rest."""

    per_device_train_batch_size: int = Field(4, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    tokens_per_batch: int | None = Field(
        None,
        ge=1,
        description="data.packing=padding_free: cut each optimizer step's samples (batch x "
        "ranks x accumulation, unchanged) into packed micro-batches of at most this many "
        "tokens, no sample split (fairseq's --max-tokens); same loss, other speed and memory",
    )
    learning_rate: float = Field(2e-4, gt=0)
    num_train_epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optim: str = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    param_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="full/layers under bf16, one process: float32 keeps fp32 weights under "
        "autocast (exact); bfloat16 keeps bf16 weights and fp32 master weights in the optimizer "
        "(no per-forward weight casts; FSDP's term)",
    )
    gradient_checkpointing: bool = False
    chunked_loss: bool = Field(
        True, description="loss over the vocabulary in token chunks, no full fp32 logits"
    )
    compile: bool = Field(
        False, description="torch.compile the norms, SwiGLU and RoPE of each block (CUDA)"
    )
    fused_lora: bool = Field(
        True,
        description="LoRA layers compute base and adapter matmuls in one function "
        "(one GPU, DDP, ZeRO-2); false: peft's own forward",
    )
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(200, ge=1)
    eval_steps: int | None = Field(
        None, ge=1, description="with held-out data (data.eval_fraction): default save_steps"
    )
    seed: int = 42
    dataloader_num_workers: int = Field(2, ge=0)
    report_to: list[Reporter] = Field(default_factory=lambda: list[Reporter](["tensorboard"]))
    args: dict[str, Any] = Field(
        default_factory=dict, description="other TrainingArguments fields, checked by name"
    )

    @field_validator("report_to")
    @classmethod
    def _reporters_importable(cls, value: list[Reporter]) -> list[Reporter]:
        # transformers imports a reporter only when training starts: one that is not
        # installed would crash the job after the model and data were loaded (and Slurm
        # requeues the crash).
        absent = [
            r for r in value if r != "none" and not any(map(_importable, REPORTER_MODULES[r]))
        ]
        if absent:
            raise ValueError(
                f"{', '.join(absent)} cannot be used: not installed in this environment "
                f"(pip install {' '.join(REPORTER_MODULES[r][0] for r in absent)} in your own "
                "image), or use [tensorboard] or [none]"
            )
        return value

    @field_validator("args")
    @classmethod
    def _known_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        from transformers import TrainingArguments

        known = {f.name for f in dataclasses.fields(TrainingArguments)}
        owned = set(cls.model_fields) | {"output_dir", "bf16", "fp16", "save_total_limit"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"not TrainingArguments fields: {', '.join(unknown)}")
        clash = sorted(set(value) & owned)
        if clash:
            raise ValueError(f"set these in their own keys, not training.args: {', '.join(clash)}")
        return value


class GenerationSection(Section):
    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(8, ge=1)
    samples: int = Field(0, ge=0, description="after finetune, answer this many eval prompts")
    device_map: Literal["auto"] | None = None


class OutputSection(Section):
    dir: str = "runs/llmtrain"
    merge: bool = Field(False, description="after a LoRA run also write the merged model")
    keep_checkpoints: int = Field(2, ge=2, description="newest N complete checkpoints kept")
    keep_best: bool = Field(
        True, description="also keep the checkpoint with the lowest eval loss (named in `best`)"
    )
    resume: str = Field("auto", description="auto | never | path to a checkpoint")


class DistributedSection(Section):
    strategy: Literal["auto", "ddp", "fsdp", "zero2", "zero3", "zero3_offload"] = "auto"
    timeout_minutes: float = Field(10.0, gt=0, description="collective timeout before failing")
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="dtype of the gradient reduction of fsdp and zero*: bf16 halves its traffic "
        "and rounds each sum to 8 bits of mantissa",
    )
    allow_topology_change: bool = Field(
        False, description="resume even if world size, batch or data changed"
    )


class RunConfig(Section):
    model: ModelSection
    data: DataSection
    method: MethodSection = Field(default_factory=MethodSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    output: OutputSection = Field(default_factory=OutputSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    def prepared_dir(self) -> Path:
        return Path(self.data.prepared_dir or Path(self.output.dir) / "prepared")

    @model_validator(mode="after")
    def _token_budget(self) -> RunConfig:
        budget = self.training.tokens_per_batch
        if budget is None:
            return self
        if self.data.packing != "padding_free":
            raise ValueError(
                f"training.tokens_per_batch={budget} packs micro-batches up to a token budget, "
                f"which needs data.packing=padding_free (it is {self.data.packing}): set "
                "data.packing=padding_free, or remove training.tokens_per_batch"
            )
        if budget < self.data.max_length:
            raise ValueError(
                f"training.tokens_per_batch={budget} is smaller than data.max_length="
                f"{self.data.max_length}: a sample that long would not fit a micro-batch; "
                f"set training.tokens_per_batch >= {self.data.max_length}"
            )
        return self

    @model_validator(mode="after")
    def _preference_keys(self) -> RunConfig:
        method = self.method.name
        if method not in PREFERENCE_METHODS and "preference" in self.model_fields_set:
            raise ValueError(
                f"the preference section is used only with method.name=dpo or orpo, not {method}"
            )
        if method == "orpo" and "preference" in self.model_fields_set:
            dpo_only = sorted(
                {"loss_type", "label_smoothing"} & self.preference.model_fields_set
            )
            if dpo_only:
                raise ValueError(
                    f"preference.{', preference.'.join(dpo_only)} belong to dpo; orpo's loss "
                    "is the NLL of the chosen answer minus beta x log sigmoid(log odds ratio)"
                )
        return self


def _field_annotation(keys: list[str]) -> Any:
    """The schema's type of the dotted key, or None when the key is not a schema field (an
    unknown key, or one inside a free dict such as training.args)."""
    model: type[BaseModel] = RunConfig
    for i, key in enumerate(keys):
        info = model.model_fields.get(key)
        if info is None:
            return None
        if i == len(keys) - 1:
            return info.annotation
        if not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return None
        model = info.annotation
    return None


def _text_field(annotation: Any) -> tuple[bool, bool]:
    """(holds text only: str or a Literal of strings, and may be None)."""
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()
    members = members or (annotation,)
    nullable = type(None) in members
    rest = [m for m in members if m is not type(None)]

    def is_text(m: Any) -> bool:
        return m is str or (
            get_origin(m) is Literal and all(isinstance(v, str) for v in get_args(m))
        )

    return bool(rest) and all(is_text(m) for m in rest), nullable


def _hashes(value: Any) -> int:
    """How many '#' the parsed value holds, to tell whether YAML cut a comment off."""
    if isinstance(value, str):
        return value.count("#")
    if isinstance(value, dict):
        return sum(_hashes(k) + _hashes(v) for k, v in value.items())
    if isinstance(value, list):
        return sum(_hashes(v) for v in value)
    return 0


def parse_override(item: str) -> tuple[list[str], Any]:
    """`dotted.key=value` -> (key path, value).

    A text field of the schema (str, or a choice among strings) takes the text after '=' as is,
    braces, colons and '#' included; `null` unsets one that may be null. Any other value is
    parsed as YAML (numbers, booleans, lists like `[q_proj,v_proj]`, mappings).

    Raises:
        ConfigError: not of the form key=value, not valid YAML, or cut by a YAML comment (64).
    """
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            f"override {item!r} is not of the form dotted.key=value",
            "write overrides like training.learning_rate=1e-4 or output.dir=runs/x",
        )
    keys = key.split(".")
    text, nullable = _text_field(_field_annotation(keys))
    if text:
        if nullable and raw == "null":
            return keys, None
        if "\\n" in raw:
            log.warning(
                "override %r holds a backslash and n, kept as those two characters; for a "
                "line break write it in the YAML file, or in bash as $'...\\n...'",
                item,
            )
        return keys, raw
    if not raw:
        return keys, ""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"override {item!r}: the value is not valid YAML ({problem})",
            f"give {key} a YAML value (a number, true/false, or a list like [a, b]); put "
            "text with spaces, ':' or '#' in quotes inside it",
        ) from None
    if _hashes(value) < raw.count("#"):
        raise ConfigError(
            f"override {item!r}: '#' starts a YAML comment here, which would cut the value "
            f"to {value!r}",
            "put the text that holds '#' in quotes inside the value, e.g. [\"a #b\"]",
        )
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`raw`, a parsed config mapping, with each dotted `key=value` override set in it (in place).

    Raises:
        ConfigError: an override is not key=value (parse_override), or its key path runs through a
            key that holds a value, not a section (exit 64)."""
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {k!r} is a value, not a section",
                    "check the key path against the config",
                )
            node = child
        node[keys[-1]] = value
    return raw


def _covers(override: str, loc: list[str]) -> bool:
    """The override set the key at `loc`, or a section or list that holds it."""
    keys = override.partition("=")[0].split(".")
    return loc[: len(keys)] == keys


def _format_errors(err: ValidationError, overrides: list[str]) -> tuple[list[str], int]:
    """One line per problem, `override 'k=v': ` in front of those an override caused; and how
    many an override caused."""
    problems = []
    from_overrides = 0
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling against configs/*.yaml"
        elif e["type"] == "missing":
            msg = "required; add it"
        # The last override of a key (or of a section above it) is the one that counts.
        cause = next((o for o in reversed(overrides) if _covers(o, loc)), None)
        if cause is not None:
            from_overrides += 1
            problems.append(f"override {cause!r}: {key}: {msg}")
        else:
            problems.append(f"{key}: {msg}")
    return problems, from_overrides


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (an empty file is an empty mapping).

    Raises:
        ConfigError: the file does not exist, is not valid YAML, or holds something other than a
            mapping (exit 64)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} does not exist",
            "pass the path of a run config, for example configs/lora.yaml",
        )
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config file {str(p)!r} is not valid YAML: {exc}", "fix the syntax"
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping", "see configs/lora.yaml")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The run config from a YAML file and dotted overrides, validated against the schema.

    Raises:
        ConfigError: the file cannot be read (read_yaml), an override is malformed
            (apply_overrides), or the config breaks the schema; every problem is listed at once,
            each naming its key and whether an override caused it (exit 64)."""
    overrides = overrides or []
    raw = apply_overrides(read_yaml(path), overrides)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        problems, from_overrides = _format_errors(err, overrides)
    if from_overrides == len(problems):
        head = f"the command-line overrides have {len(problems)} problem(s):"
        fix = "change the overrides named above"
    elif from_overrides:
        head = (
            f"config {str(path)!r} and its command-line overrides have {len(problems)} "
            f"problem(s), {from_overrides} from overrides:"
        )
        fix = "change the overrides and keys named above"
    else:
        head = f"config {str(path)!r} has {len(problems)} problem(s):"
        fix = "change the keys named above (dotted overrides work too: key.sub=value)"
    raise ConfigError(head, fix, problems=problems)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
