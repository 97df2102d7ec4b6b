"""The run resolved once: which strategy, precision, weight dtype, attention and speed levers a
config gets in this world on this hardware, each with the reason (`RunPlan`), and the one table
of distributed strategies and the methods validated with each (`STRATEGIES`).

Training (train/run.py) builds the plan once and follows it, and writes it into manifest.json;
the estimator (sizing/) builds the same plan for the target GPU node instead of restating the
policy. Nothing here imports torch or transformers: what the machine has (CUDA, bf16, flash_attn)
and what the architecture supports are passed in, so `estimate` and `validate` stay light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

from llmtrain import stack
from llmtrain.config import PREFERENCE_METHODS, RunConfig
from llmtrain.errors import ConfigError, NeedsGpuError

Strategy = Literal["single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload"]
Method = Literal["full", "layers", "lora", "qlora"]
METHODS: tuple[Method, ...] = get_args(Method)
ADAPTER_METHODS: tuple[Method, ...] = ("lora", "qlora")
# Every method.name: the weight methods, and dpo/orpo, pair losses around LoRA or full weights
# (preference.weights) that are validated with one process and DDP only (train/preference.py).
ALL_METHODS: tuple[str, ...] = (*METHODS, *PREFERENCE_METHODS)
ATTENTIONS = ("flash_attention_2", "sdpa", "eager")


@dataclass(frozen=True)
class StrategySpec:
    """One distributed strategy as the pinned stack (accelerate 0.26.0, DeepSpeed 0.14, peft
    0.9.0) runs it."""

    shards_parameters: bool  # each rank holds a shard of every weight, lm_head included
    deepspeed_json: str | None  # the package's deepspeed/*.json, None: not DeepSpeed
    # Every weight is whole on the GPU when a layer runs, so the fused LoRA function
    # (kernels/lora.py) may replace peft's forward; FSDP's and ZeRO-3's per-module hooks gather
    # the weights inside peft's forward, so it stays there.
    fused_lora: bool
    needs_cuda: bool  # accelerate 0.26 starts DeepSpeed with NCCL only
    # The strategy runs the blocks in one 16-bit dtype itself (DeepSpeed casts the model, FSDP's
    # mixed precision gathers 16-bit copies): the Trainer's autocast has nothing left to cast.
    computes_in_16bit: bool
    # The methods that train, resume and save with it, each run on H200s by tests/gpu and
    # bench/strategies.py (bench/STRATEGIES.md); `check` refuses every other pair.
    methods: tuple[str, ...]


# Keyed by Strategy (a test holds them equal). Columns: shards_parameters, deepspeed_json,
# fused_lora, needs_cuda, computes_in_16bit, methods.
STRATEGIES: dict[str, StrategySpec] = {
    "single": StrategySpec(False, None, True, False, False, ALL_METHODS),
    "ddp": StrategySpec(False, None, True, False, False, ALL_METHODS),
    "fsdp": StrategySpec(True, None, False, False, True, ("full", "lora")),
    "zero2": StrategySpec(False, "zero2.json", True, True, True, ("full", "layers", "lora")),
    "zero3": StrategySpec(True, "zero3.json", False, True, True, ("full", "lora")),
    "zero3_offload": StrategySpec(
        True, "zero3_offload.json", False, True, True, ("full", "lora")
    ),
}
# Pairs outside the validated set that `check` lets through on purpose, each with its reason.
# Empty: every unvalidated pair is refused.
KNOWINGLY_ALLOWED: dict[tuple[str, str], str] = {}
# method -> the strategies it is validated with (the table read by method)
VALIDATED: dict[str, tuple[str, ...]] = {
    m: tuple(s for s, spec in STRATEGIES.items() if m in spec.methods) for m in ALL_METHODS
}


def _config_name(strategy: str) -> str:
    """The distributed.strategy value that selects it (single is auto in a world of one)."""
    return "auto" if strategy == "single" else strategy


def refusal(method: str, strategy: str) -> ConfigError | None:
    """Why `method` cannot run with `strategy`, or None for a validated (or knowingly allowed)
    pair. The error names the pair and, as the fix, the validated alternatives."""
    if method in STRATEGIES[strategy].methods or (method, strategy) in KNOWINGLY_ALLOWED:
        return None
    key = f"method {method} with distributed.strategy={_config_name(strategy)}"
    others = ", ".join(_config_name(s) for s in VALIDATED[method] if s != "single")
    if method == "qlora" and STRATEGIES[strategy].shards_parameters:
        return ConfigError(
            f"{key} is not possible with peft 0.9.0 (4-bit weights cannot be sharded)",
            "use distributed.strategy=ddp (or auto), or method lora with fsdp/zero3",
        )
    if method == "layers" and STRATEGIES[strategy].shards_parameters:
        return ConfigError(
            f"{key}: sharding a model that is mostly frozen gains little and mixes frozen and "
            "trained parameters in one shard",
            f"use distributed.strategy={others.replace(', ', ' or ')}",
        )
    methods = ", ".join(STRATEGIES[strategy].methods)
    return ConfigError(
        f"{key} is not a validated combination: it has not been trained, resumed and saved on "
        f"GPUs (bench/STRATEGIES.md); {_config_name(strategy)} is validated with {methods}",
        f"use distributed.strategy={others.replace(', ', ' or ')} (or auto) with method "
        f"{method}, or one of {methods} with {_config_name(strategy)}",
    )


# TrainingArguments fields a strategy owns: set through distributed.strategy, not training.args.
OWNED_ARGS = ("deepspeed", "fsdp", "fsdp_config", "ddp_find_unused_parameters", "ddp_backend")


@dataclass(frozen=True)
class World:
    """The process layout torchrun or accelerate gave this process, and when the job wants it
    to stop (entrypoint/launch.sh sets the LLMTRAIN_* variables; the defaults: never)."""

    rank: int
    local_rank: int
    world_size: int
    stop_file: str | None = None  # LLMTRAIN_STOP_FILE: once it exists, checkpoint and exit 75
    deadline: float | None = None  # LLMTRAIN_DEADLINE: the job's end, Unix time in seconds
    deadline_margin_s: float = 300.0  # LLMTRAIN_DEADLINE_MARGIN: stop this long before it
    stop_check_steps: int = 1  # LLMTRAIN_STOP_CHECK_STEPS: ranks agree on stopping this often

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")),
            stop_file=env.get("LLMTRAIN_STOP_FILE") or None,
            deadline=float(env["LLMTRAIN_DEADLINE"]) if env.get("LLMTRAIN_DEADLINE") else None,
            deadline_margin_s=float(env.get("LLMTRAIN_DEADLINE_MARGIN", "300")),
            stop_check_steps=int(env.get("LLMTRAIN_STOP_CHECK_STEPS", "1")),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def launched(self) -> bool:
        """Started by torchrun or accelerate, even as a world of one."""
        return "LOCAL_RANK" in os.environ


@dataclass(frozen=True)
class Hardware:
    """What the machine the run is planned for has; train/run.py measures this one, the
    estimator assumes a GPU node (`gpu_node`)."""

    cuda: bool
    bf16: bool  # the GPU computes in bfloat16 natively (Ampere and later; not V100 or T4)
    flash_attn: bool  # the flash_attn package imports and the GPU runs it (Ampere and later)
    # False only for a ROCm GPU with bf16 that flash-attn 2 does not support (MI100, RDNA): the
    # reason given when flash_attn is False, which the planner cannot tell from the package.
    flash_attn_arch: bool = True

    @classmethod
    def gpu_node(cls, *, flash_attn: bool, bf16: bool = True) -> Hardware:
        """A CUDA GPU node (what `estimate` and `validate` plan for): Ampere or later unless
        `bf16` is False (a V100: no bf16, no flash-attn 2); `flash_attn`: the package imports."""
        return cls(cuda=True, bf16=bf16, flash_attn=flash_attn and bf16)

    @classmethod
    def cpu(cls) -> Hardware:
        return cls(cuda=False, bf16=False, flash_attn=False)


def launcher_strategy() -> str | None:
    """FSDP or DeepSpeed asked for by `accelerate launch --config_file ...` (its env vars)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return None


def resolve_strategy(cfg: RunConfig, world: World) -> tuple[Strategy, str]:
    """The strategy this process runs and why: auto is ddp under a launcher, else single,
    unless an accelerate config chose FSDP.

    Raises:
        ConfigError: a launcher asks for another strategy than the run config (two sources of
            truth would train one way and save another), or for DeepSpeed (exit 64).
    """
    strategy = cfg.distributed.strategy
    launched = launcher_strategy()
    if launched == "deepspeed":
        raise ConfigError(
            "accelerate launch was given a DeepSpeed config; llmtrain selects DeepSpeed itself",
            "launch with configs/accelerate/ddp.yaml (or torchrun) and set "
            "distributed.strategy=zero2, zero3 or zero3_offload in the run config",
        )
    if launched == "fsdp" and strategy not in ("auto", "fsdp"):
        raise ConfigError(
            f"accelerate launch was given an FSDP config but distributed.strategy={strategy}",
            "use configs/accelerate/ddp.yaml with this strategy, or set distributed.strategy=fsdp",
        )
    if strategy != "auto":
        return cast(Strategy, strategy), f"distributed.strategy={strategy}"
    if launched == "fsdp":
        return "fsdp", "auto: accelerate launch was given an FSDP config"
    if world.distributed:
        return "ddp", f"auto: {world.world_size} processes"
    return "single", "auto: one process"


def check(cfg: RunConfig) -> None:
    """Refuse what the pinned stack cannot run (peft 0.9.0, accelerate 0.26.0): every method x
    strategy pair outside `STRATEGIES`' validated methods, DoRA where peft 0.9.0 has none, and
    training.args that a strategy owns. Needs no model, no GPU.

    Raises:
        ConfigError: the first such problem (exit 64).
    """
    method = cfg.method.name
    # auto is single or ddp (the same validated methods), or FSDP under
    # `accelerate launch --config_file fsdp.yaml` (resolve_strategy).
    strategy: str = (
        cfg.distributed.strategy
        if cfg.distributed.strategy != "auto"
        else "fsdp" if launcher_strategy() == "fsdp" else "ddp"
    )
    refused = refusal(method, strategy)
    if refused is not None:
        raise refused
    if cfg.lora.use_dora and method == "qlora":
        raise ConfigError(
            "lora.use_dora=true with method.name=qlora: peft 0.9.0 has no DoRA for "
            "bitsandbytes 4-bit layers (its Linear4bit refuses use_dora)",
            "use method.name=lora for DoRA, or lora.use_dora=false with qlora",
        )
    if cfg.lora.use_dora and STRATEGIES[strategy].shards_parameters:
        raise ConfigError(
            f"lora.use_dora=true with distributed.strategy={strategy} does not work with peft "
            "0.9.0: its DoRA forward reads lora_A, lora_B and the base weight directly, outside "
            "their modules' forward, where FSDP (lora_A and lora_B are their own units) and "
            "ZeRO-3 hold only this rank's shard",
            "use distributed.strategy=ddp or zero2 with DoRA, or lora.use_dora=false",
        )
    check_target_parameters(cfg, strategy)
    check_param_dtype(cfg)
    owned = sorted(set(cfg.training.args) & set(OWNED_ARGS))
    if owned:
        raise ConfigError(
            f"training.args sets {', '.join(owned)}, which distributed.strategy owns",
            "remove them and choose distributed.strategy (ddp, fsdp, zero2, zero3, zero3_offload)",
        )


def trained_method(cfg: RunConfig) -> Method:
    """The method of the weights a run trains: method.name, or for dpo and orpo
    preference.weights (lora or full)."""
    name = cfg.method.name
    return cast(Method, cfg.preference.weights if name in PREFERENCE_METHODS else name)


# peft's LoRA on parameters (ParamWrapper), which lora.target_parameters asks for.
TARGET_PARAMETERS_PEFT = "0.17.0"


def check_target_parameters(cfg: RunConfig, strategy: str) -> None:
    """lora.target_parameters (peft's LoRA on a parameter, for a mixture of experts' fused 3-D
    expert weights) only where peft applies it as asked. Needs no model (the names are checked
    against the model by methods.lora_target_parameters).

    Raises:
        ConfigError: peft older than 0.17 (the pinned stack), lora.dropout > 0, DoRA, method
            qlora, or a strategy that shards parameters (exit 64).
    """
    lora = cfg.lora
    if not (lora.target_parameters and trained_method(cfg) in ADAPTER_METHODS):
        return
    if not stack.at_least("peft", TARGET_PARAMETERS_PEFT):
        raise ConfigError(
            f"lora.target_parameters needs peft >= {TARGET_PARAMETERS_PEFT}; this stack has "
            f"peft {stack.installed('peft')}",
            "on this stack transformers keeps each expert as Linear layers (Mixtral's w1, w2, "
            "w3), which lora.target_modules (auto) adapts: remove lora.target_parameters; or "
            + stack.CURRENT_IMAGE_HINT,
        )
    if lora.dropout > 0:
        raise ConfigError(
            f"lora.target_parameters with lora.dropout={lora.dropout}: peft adds LoRA to a "
            "parameter as a weight delta, where dropout on the layer's input has no place, and "
            "its one dropout applies to every target",
            "set lora.dropout=0",
        )
    if lora.use_dora:
        raise ConfigError(
            "lora.target_parameters with lora.use_dora=true: peft's LoRA on parameters has no "
            "DoRA",
            "set lora.use_dora=false",
        )
    if trained_method(cfg) == "qlora":
        raise ConfigError(
            "lora.target_parameters with method.name=qlora: bitsandbytes quantizes Linear "
            "layers only, so the expert weights stay unquantized, and qlora's preparation "
            "casts them to float32",
            "use method.name=lora",
        )
    if STRATEGIES[strategy].shards_parameters:
        raise ConfigError(
            f"lora.target_parameters with distributed.strategy={strategy}: LoRA on sharded "
            "expert weights (FSDP, ZeRO-3) is not checked in llmtrain",
            "use distributed.strategy=ddp or zero2",
        )


def check_param_dtype(cfg: RunConfig) -> None:
    """training.param_dtype=bfloat16 (bf16 weights, fp32 master weights in the optimizer) where
    it applies: trained full weights (method full or layers), bf16 compute, one process.

    Raises:
        ConfigError: another method, precision, model.dtype or an explicit multi-process
            strategy (exit 64).
    """
    if cfg.training.param_dtype != "bfloat16":
        return
    name = cfg.method.name
    if name not in ("full", "layers"):
        raise ConfigError(
            f"training.param_dtype=bfloat16 with method.name={name}: master weights are for "
            "trained full weights; "
            + ("LoRA adapters train in fp32 over 16-bit frozen weights already"
               if name in ADAPTER_METHODS else f"{name} is not ported to them yet"),
            "use method.name=full or layers, or remove training.param_dtype",
        )
    if cfg.training.precision in ("fp16", "fp32"):
        raise ConfigError(
            f"training.param_dtype=bfloat16 with training.precision={cfg.training.precision}: "
            "bf16 weights compute in bf16",
            "set training.precision=bf16 (or auto on a bf16 GPU), or remove training.param_dtype",
        )
    if cfg.model.dtype not in ("auto", "bfloat16"):
        raise ConfigError(
            f"training.param_dtype=bfloat16 with model.dtype={cfg.model.dtype}: the weights "
            "would load in one dtype and train in another",
            "set model.dtype=auto, or remove training.param_dtype",
        )
    if cfg.distributed.strategy != "auto":
        raise ConfigError(
            f"training.param_dtype=bfloat16 with distributed.strategy="
            f"{cfg.distributed.strategy}: master weights run in one process only for now (under "
            "DDP the gradients of earlier micro-batches would leave the model before the "
            "all-reduce; FSDP and DeepSpeed keep fp32 master weights themselves)",
            "train on one GPU, or remove training.param_dtype",
        )


def check_world(strategy: str, world: World, *, cuda: bool) -> None:
    """The resolved strategy against this process's world and machine (`cuda`).

    Raises:
        ConfigError: DeepSpeed without CUDA, or FSDP without a launcher (or on CPU in a world
            of one) (exit 64).
    """
    if STRATEGIES[strategy].needs_cuda and not cuda:
        raise ConfigError(
            f"distributed.strategy={strategy} needs CUDA GPUs: accelerate 0.26 starts "
            "DeepSpeed with NCCL only",
            "on CPU use distributed.strategy=ddp or fsdp (gloo)",
        )
    # accelerate 0.26 counts a launched process as distributed on a GPU even in a world of one
    # (a one-GPU FSDP run is the reference for multi-GPU ones), on a CPU only from two up.
    if strategy == "fsdp" and not (world.distributed or (world.launched and cuda)):
        raise ConfigError(
            "distributed.strategy=fsdp needs a launcher (transformers refuses FSDP in a "
            "process without torch.distributed), and on CPU two processes or more",
            "run it through torchrun or entrypoint/launch.sh, or use ddp/auto on one GPU",
        )


def choose_attention(
    choice: str, supports: Mapping[str, bool] | None, hw: Hardware, model_type: str = "model"
) -> tuple[str, str]:
    """The attention implementation and why: flash_attention_2 when flash_attn is usable on
    `hw` (it imports and the GPU runs it) and the architecture has it, else sdpa, else eager.
    `supports`: implementation -> the architecture has it; None: a Llama-style decoder, which
    has all three.

    Raises:
        ConfigError: an explicit choice the architecture lacks, or flash_attention_2 without
            a usable flash_attn (exit 64), never a silent fallback.
    """
    has = dict(supports) if supports is not None else {a: True for a in ATTENTIONS}
    has["eager"] = True
    if choice != "auto":
        if not has.get(choice, False):
            raise ConfigError(
                f"model.attn_implementation={choice} is not supported for {model_type} by "
                "transformers 4.37.2",
                "use model.attn_implementation=auto",
            )
        if choice == "flash_attention_2" and not hw.flash_attn:
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 cannot run on the target: "
                f"{_no_flash_attn(hw)}",
                "run inside the llmtrain image on an A100 or later, or use "
                "model.attn_implementation=auto",
            )
        return choice, f"model.attn_implementation={choice}"
    if has.get("flash_attention_2") and hw.flash_attn:
        return "flash_attention_2", "auto: flash_attn imports and the architecture has it"
    if has.get("sdpa"):
        if has.get("flash_attention_2"):
            elsewhere = (
                "" if hw.cuda and not hw.bf16
                else " (in the llmtrain image on an A100 or later: flash_attention_2)"
            )
            return "sdpa", f"auto: {_no_flash_attn(hw)}{elsewhere}"
        return "sdpa", f"auto: {model_type} has no flash_attention_2 in transformers 4.37.2"
    return "eager", f"auto: {model_type} has neither flash_attention_2 nor sdpa"


def _no_flash_attn(hw: Hardware) -> str:
    """Why flash-attn 2 cannot run on `hw` (whose flash_attn is False)."""
    if not hw.cuda:
        return "the target has no CUDA GPU"
    if not hw.bf16:
        return (
            "the GPU is older than compute capability 8.0 (V100, T4; on ROCm, older than MI200), "
            "which flash-attn 2 needs"
        )
    if not hw.flash_attn_arch:
        return "flash-attn 2 does not run on this ROCm GPU (it needs MI200, MI300 or MI350)"
    return "flash_attn does not import in this environment"


def check_bf16_settings(cfg: RunConfig, hw: Hardware) -> None:
    """Every explicit bf16 setting at once, refused on a GPU without native bf16.

    Raises:
        NeedsGpuError: a bf16 setting for a GPU of compute capability below 8.0 (exit 64).
    """
    if not hw.cuda or hw.bf16:
        return
    settings = {
        "training.precision": (cfg.training.precision, "bf16"),
        "training.param_dtype": (cfg.training.param_dtype, "bfloat16"),
        "model.dtype": (cfg.model.dtype, "bfloat16"),
        "distributed.reduce_dtype": (cfg.distributed.reduce_dtype, "bf16"),
    }
    found = [f"{key}={value}" for key, (value, bf16) in settings.items() if value == bf16]
    if found:
        raise NeedsGpuError(
            f"{', '.join(found)} on a GPU without bf16 (compute capability below 8.0, such as "
            "V100 or T4, or a ROCm GPU before MI100): torch would emulate bf16 in fp32, many "
            "times slower than fp16",
            "remove them (training.precision=auto trains in fp16 with loss scaling there), or "
            "run on an A100 or later",
        )


def precision(choice: str, hw: Hardware) -> tuple[str, str]:
    """bf16, fp16 or fp32 training (the Trainer's bf16/fp16 flags), and why."""
    if choice != "auto":
        return choice, f"training.precision={choice}"
    if hw.cuda and hw.bf16:
        return "bf16", "auto: the GPU computes in bf16"
    if hw.cuda:
        return "fp16", "auto: the GPU has no bf16"
    return "fp32", "auto: no CUDA GPU"


def weight_dtype(model_dtype: str, precision: str, method: str) -> tuple[str, str]:
    """The dtype the weights are loaded in (a torch dtype's name), and why: frozen weights in
    16 bits, trained full weights in fp32 under 16-bit autocast."""
    if model_dtype != "auto":
        return model_dtype, f"model.dtype={model_dtype}"
    half = {"bf16": "bfloat16", "fp16": "float16"}.get(precision)
    if half is not None and method in ADAPTER_METHODS:
        return half, f"frozen base weights under {precision}; the adapters train in fp32"
    if half is not None:
        return "float32", f"trained weights in fp32 under {precision} autocast"
    return "float32", "fp32 training"


def uses_autocast(precision16: bool, fp32_trained: bool, strategy: str) -> bool:
    """Whether the Trainer's 16-bit autocast runs over fp32 weights or adapters: only under a
    16-bit precision, with fp32 trained parameters, and a strategy that leaves the casting to
    it (see `StrategySpec.computes_in_16bit`)."""
    spec = STRATEGIES.get(strategy)
    return precision16 and fp32_trained and not (spec is not None and spec.computes_in_16bit)


def fused_lora_applies(requested: bool, method: str, strategy: str) -> bool:
    """training.fused_lora takes effect: method lora (not qlora's 4-bit base) with a strategy
    that keeps every weight whole when a layer runs."""
    spec = STRATEGIES.get(strategy)
    return requested and method == "lora" and spec is not None and spec.fused_lora


@dataclass(frozen=True)
class RunPlan:
    """What the run does, decided once from the config, the world and the hardware.

    `reasons` holds one short sentence per field: which setting or fact decided it."""

    strategy: Strategy
    precision: Literal["bf16", "fp16", "fp32"]
    weight_dtype: Literal["bfloat16", "float16", "float32"]  # a torch dtype's name
    autocast: bool  # the Trainer's 16-bit autocast over fp32 weights or adapters
    attention: str  # transformers' attn_implementation
    optim: str  # TrainingArguments.optim
    chunked_loss: bool  # the loss in vocabulary chunks (kernels/loss.py), if the model allows
    fused_lora: bool  # LoRA layers through the fused function (kernels/lora.py)
    adapter: bool  # the trained result is a peft adapter (final/adapter), not a model
    quantized: bool  # 4-bit NF4 base weights (bitsandbytes)
    master_weights: bool = False  # bf16 weights, fp32 master weights in the optimizer
    reasons: Mapping[str, str] = field(default_factory=dict)

    @property
    def flags(self) -> dict[str, bool]:
        """TrainingArguments' bf16 and fp16 flags."""
        return {"bf16": self.precision == "bf16", "fp16": self.precision == "fp16"}

    @property
    def compute_dtype(self) -> str:
        """The 16-bit dtype matmuls run in (QLoRA's bnb_4bit_compute_dtype); fp16 without bf16."""
        return "bfloat16" if self.precision == "bf16" else "float16"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """{field: {"value": ..., "reason": ...}}: what manifest.json records."""
        return {
            name: {"value": getattr(self, name), "reason": self.reasons.get(name, "")}
            for name in _FIELDS
        }

    def lines(self) -> list[str]:
        """One line per decision, for `validate` and `estimate`."""
        return [
            f"  {name}: {_show(getattr(self, name))} ({self.reasons[name]})" for name in _FIELDS
        ]

    @classmethod
    def build(
        cls,
        cfg: RunConfig,
        world: World,
        hw: Hardware,
        *,
        attention_support: Mapping[str, bool] | None = None,
        model_type: str = "model",
    ) -> RunPlan:
        """The plan for `cfg` in `world` on `hw`. `attention_support`: implementation -> the
        architecture has it (model/load.attention_support); None: a Llama-style decoder.

        Raises:
            ConfigError: a launcher contradicting the config (resolve_strategy), an
                attention implementation that cannot run (choose_attention), or
                training.param_dtype=bfloat16 where it does not apply (check_param_dtype,
                more than one process) (exit 64).
            NeedsGpuError: a bf16 setting on a GPU without native bf16 (check_bf16_settings),
                or training.param_dtype=bfloat16 without bf16 compute (exit 64).
        """
        t = cfg.training
        # dpo and orpo train preference.weights (lora or full): the plan is that method's, with
        # the chunked loss off (pair losses need per-token log-probs, not a loss).
        pairs = cfg.method.name in PREFERENCE_METHODS
        method = trained_method(cfg)
        strategy, why_strategy = resolve_strategy(cfg, world)
        spec = STRATEGIES[strategy]
        check_bf16_settings(cfg, hw)
        prec, why_prec = precision(t.precision, hw)
        dtype, why_dtype = weight_dtype(cfg.model.dtype, prec, method)
        masters = t.param_dtype == "bfloat16"
        if masters:
            check_param_dtype(cfg)
            if prec != "bf16":
                raise NeedsGpuError(
                    f"training.param_dtype=bfloat16 needs bf16 compute and the target has "
                    f"{'no CUDA GPU' if not hw.cuda else 'a GPU without bf16'} (precision {prec})",
                    "run on a bf16 GPU (Ampere or later), or remove training.param_dtype",
                )
            if strategy != "single":
                raise ConfigError(
                    f"training.param_dtype=bfloat16 in a world of {world.world_size} "
                    "processes: master weights run in one process only for now",
                    "train on one GPU, or remove training.param_dtype",
                )
            dtype, why_dtype = "bfloat16", "training.param_dtype=bfloat16"
        adapter = method in ADAPTER_METHODS
        if prec == "fp16" and dtype == "float16" and not adapter and not spec.computes_in_16bit:
            # The Trainer's GradScaler refuses fp16 gradients ("Attempting to unscale FP16
            # gradients") at the first optimizer step: fp16 training keeps trained weights fp32.
            raise ConfigError(
                f"model.dtype=float16 with method {method} under fp16: the trained weights "
                "would be fp16, and fp16 loss scaling (torch's GradScaler) refuses fp16 "
                "gradients at the first optimizer step",
                "use model.dtype=auto (fp32 trained weights under fp16 autocast), or "
                "distributed.strategy=zero2 (DeepSpeed scales fp16 itself)",
            )
        fp32_trained = dtype == "float32" or adapter
        autocast = uses_autocast(prec != "fp32", fp32_trained, strategy)
        if autocast:
            why_autocast = f"fp32 trained parameters under {prec}"
        elif prec == "fp32":
            why_autocast = "fp32 training"
        elif spec.computes_in_16bit:
            why_autocast = f"{strategy} computes in 16 bits itself"
        elif masters:
            why_autocast = "bf16 weights: nothing to cast"
        else:
            why_autocast = "16-bit weights throughout"
        attention, why_attention = choose_attention(
            cfg.model.attn_implementation, attention_support, hw, model_type
        )
        optim = t.optim
        if optim == "auto":
            optim = "adamw_torch_fused" if hw.cuda else "adamw_torch"
            why_optim = "auto: fused AdamW on CUDA" if hw.cuda else "auto: no CUDA GPU"
        else:
            why_optim = f"training.optim={optim}"
        chunked = t.chunked_loss and not spec.shards_parameters and not pairs
        why_chunked = (
            f"off for {cfg.method.name}: its pair loss needs per-token log-probs" if pairs
            else "training.chunked_loss=false" if not t.chunked_loss
            else f"off under {strategy}, whose lm_head weight is sharded" if not chunked
            else "training.chunked_loss=true"
        )
        fused = fused_lora_applies(t.fused_lora, method, strategy)
        why_fused = (
            f"method {method} has no fused LoRA layers" if method != "lora"
            else "training.fused_lora=false" if not t.fused_lora
            else f"off under {strategy}: its hooks gather weights inside peft's forward"
            if not fused
            else f"training.fused_lora=true under {strategy}"
        )
        return cls(
            strategy=strategy,
            precision=prec,  # type: ignore[arg-type]
            weight_dtype=dtype,  # type: ignore[arg-type]
            autocast=autocast,
            attention=attention,
            optim=optim,
            chunked_loss=chunked,
            fused_lora=fused,
            adapter=adapter,
            quantized=method == "qlora",
            master_weights=masters,
            reasons={
                "strategy": why_strategy,
                "precision": why_prec,
                "weight_dtype": why_dtype,
                "autocast": why_autocast,
                "attention": why_attention,
                "optim": why_optim,
                "chunked_loss": why_chunked,
                "fused_lora": why_fused,
                "adapter": f"method {method}",
                "quantized": f"method {method}"
                + (": 4-bit NF4 base weights (bitsandbytes)" if method == "qlora" else ""),
                "master_weights": "training.param_dtype=bfloat16: fp32 copies in the optimizer"
                if masters else f"training.param_dtype={t.param_dtype}",
            },
        )


_FIELDS = (
    "strategy", "precision", "weight_dtype", "autocast", "attention", "optim",
    "chunked_loss", "fused_lora", "adapter", "quantized", "master_weights",
)


def _show(value: object) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)
