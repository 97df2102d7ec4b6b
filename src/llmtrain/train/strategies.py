"""Distributed strategies: which combinations can work, the TrainingArguments that select one,
and the few places where transformers 4.37.2 / accelerate 0.26.0 / peft 0.9.0 / DeepSpeed 0.14
need help to train and to save a normal HF directory.

single, ddp      one model copy per process (DDP under a launcher)
fsdp             torch FSDP, full shard, one unit per transformer block; checkpoints are
                 sharded, the final save is one full state dict
zero2            DeepSpeed ZeRO-2: optimizer states and gradients sharded; overlap_comm is
                 off: with it, bf16 full fine-tuning on 2 H200s gave NaN from the second
                 step (DeepSpeed 0.14.5, torch 2.11; DeepSpeed#5241)
zero3            DeepSpeed ZeRO-3: parameters sharded too; the final save gathers 16-bit weights
zero3_offload    ZeRO-3 with parameters and optimizer states in CPU memory; the optimizer is
                 the Trainer's torch AdamW on CPU, not DeepSpeedCPUAdam, whose op would be
                 compiled at run time on every node (nvcc, ninja, a writable cache)

The DeepSpeed configs are the package's deepspeed/*.json (configs/deepspeed/ links to them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

from llmtrain import compat
from llmtrain.config import RunConfig
from llmtrain.errors import ConfigError

DEEPSPEED = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}
SHARDED = ("fsdp", "zero3", "zero3_offload")  # strategies that split the parameters themselves
# The combinations that train and save, each run on H200s by tests/gpu and bench/strategies.py
# (bench/STRATEGIES.md); `check` refuses the others.
VALIDATED: dict[str, tuple[str, ...]] = {
    "full": ("single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload"),
    "lora": ("single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload"),
    "layers": ("single", "ddp", "zero2"),
    "qlora": ("single", "ddp"),
}
# TrainingArguments fields a strategy owns: set through distributed.strategy, not training.args.
OWNED_ARGS = ("deepspeed", "fsdp", "fsdp_config", "ddp_find_unused_parameters", "ddp_backend")


@dataclass(frozen=True)
class World:
    """The process layout torchrun or accelerate gave this process."""

    rank: int
    local_rank: int
    world_size: int

    @classmethod
    def from_env(cls) -> World:
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
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


def launcher_strategy() -> str | None:
    """FSDP or DeepSpeed asked for by `accelerate launch --config_file ...` (its env vars)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return None


def resolve(cfg: RunConfig, world: World) -> str:
    """The strategy this process runs: auto is ddp under a launcher, else single, unless an
    accelerate config chose FSDP. A launcher asking for another strategy than the run config
    is an error: two sources of truth would train one way and save another."""
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
    if strategy == "auto":
        return launched or ("ddp" if world.distributed else "single")
    return strategy


def check(cfg: RunConfig) -> None:
    """Refuse the combinations the pinned stack cannot run (peft 0.9.0, accelerate 0.26.0)."""
    strategy, method = cfg.distributed.strategy, cfg.method.name
    if method == "qlora" and strategy in SHARDED:
        raise ConfigError(
            f"method qlora with distributed.strategy={strategy} is not possible with peft 0.9.0 "
            "(4-bit weights cannot be sharded)",
            "use distributed.strategy=ddp (or auto), or method lora with fsdp/zero3",
        )
    if method == "layers" and strategy in SHARDED:
        raise ConfigError(
            f"method layers with distributed.strategy={strategy}: sharding a model that is "
            "mostly frozen gains little and mixes frozen and trained parameters in one shard",
            "use distributed.strategy=ddp or zero2",
        )
    if cfg.lora.use_dora and method == "qlora":
        raise ConfigError(
            "lora.use_dora=true with method.name=qlora: peft 0.9.0 has no DoRA for "
            "bitsandbytes 4-bit layers (its Linear4bit refuses use_dora)",
            "use method.name=lora for DoRA, or lora.use_dora=false with qlora",
        )
    # auto under `accelerate launch --config_file fsdp.yaml` is FSDP too (resolve).
    sharded = strategy if strategy != "auto" else launcher_strategy() or strategy
    if cfg.lora.use_dora and sharded in SHARDED:
        raise ConfigError(
            f"lora.use_dora=true with distributed.strategy={sharded} does not work with peft "
            "0.9.0: its DoRA forward reads lora_A, lora_B and the base weight directly, outside "
            "their modules' forward, where FSDP (lora_A and lora_B are their own units) and "
            "ZeRO-3 hold only this rank's shard",
            "use distributed.strategy=ddp or zero2 with DoRA, or lora.use_dora=false",
        )
    owned = sorted(set(cfg.training.args) & set(OWNED_ARGS))
    if owned:
        raise ConfigError(
            f"training.args sets {', '.join(owned)}, which distributed.strategy owns",
            "remove them and choose distributed.strategy (ddp, fsdp, zero2, zero3, zero3_offload)",
        )


def check_world(strategy: str, world: World) -> None:
    import torch

    if strategy in DEEPSPEED and not torch.cuda.is_available():
        raise ConfigError(
            f"distributed.strategy={strategy} needs CUDA GPUs: accelerate 0.26 starts "
            "DeepSpeed with NCCL only",
            "on CPU use distributed.strategy=ddp or fsdp (gloo)",
        )
    # accelerate 0.26 counts a launched process as distributed on a GPU even in a world of one
    # (a one-GPU FSDP run is the reference for multi-GPU ones), on a CPU only from two up.
    if strategy == "fsdp" and not (
        world.distributed or (world.launched and torch.cuda.is_available())
    ):
        raise ConfigError(
            "distributed.strategy=fsdp needs a launcher (transformers refuses FSDP in a "
            "process without torch.distributed), and on CPU two processes or more",
            "run it through torchrun or entrypoint/launch.sh, or use ddp/auto on one GPU",
        )


def deepspeed_config(name: str) -> dict[str, Any]:
    text = (resources.files("llmtrain") / "deepspeed" / DEEPSPEED[name]).read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def fsdp_settings(block_class: str) -> dict[str, Any]:
    """TrainingArguments.fsdp_config as transformers 4.37.2 reads it: it copies these into
    FSDP_* environment variables, so flags are the strings "true"/"false", prefetch is read
    from the key `fsdp_backward_prefetch`, and limit_all_gathers is read as a bool."""
    return {
        "transformer_layer_cls_to_wrap": [block_class],
        "fsdp_backward_prefetch": "backward_pre",
        # Every rank loads the same checkpoint, so nothing to broadcast from rank 0.
        "sync_module_states": "false",
        # transformers 4.37.2 builds the optimizer before accelerate wraps the model, and
        # accelerate 0.26 does not remap it: only the original parameter objects, kept alive
        # by use_orig_params, are the ones FSDP trains. With false, nothing would learn.
        "use_orig_params": "true",
        "limit_all_gathers": True,
    }


def training_kwargs(cfg: RunConfig, world: World, block_class: str | None) -> dict[str, Any]:
    """The TrainingArguments entries that select the strategy."""
    strategy = resolve(cfg, world)
    check_world(strategy, world)
    kwargs: dict[str, Any] = {
        "ddp_timeout": int(cfg.distributed.timeout_minutes * 60),
        # Frozen parameters (LoRA, layers) are known up front; searching for unused ones each
        # step costs time and breaks with gradient checkpointing.
        "ddp_find_unused_parameters": False,
    }
    if strategy == "fsdp":
        if block_class is None:
            raise ConfigError(
                "distributed.strategy=fsdp could not find the transformer block class to wrap",
                "use distributed.strategy=zero3 for this architecture",
            )
        kwargs["fsdp"] = "full_shard auto_wrap"
        kwargs["fsdp_config"] = fsdp_settings(block_class)
    elif strategy in DEEPSPEED:
        kwargs["deepspeed"] = {
            **deepspeed_config(strategy),
            "communication_data_type": cfg.distributed.reduce_dtype,
        }
    return kwargs


def prepare_trainer(trainer: Any, cfg: RunConfig) -> None:
    """After the Trainer is built, before it wraps the model: the strategy's missing pieces."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None and launcher_strategy() == "fsdp":
        plugin = compat.fsdp_on_cpu(trainer)
    if plugin is not None:
        if cfg.method.name in ("lora", "qlora"):
            from peft.utils.other import fsdp_auto_wrap_policy

            plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
        _reduce_dtype(plugin, trainer.args, cfg.distributed.reduce_dtype)
        # Checkpoints: each rank writes its own shard (a full state dict would gather the whole
        # model and optimizer on rank 0 every save_steps). The final save switches to full.
        _sharded_checkpoints(plugin)
    if getattr(trainer.accelerator.state, "deepspeed_plugin", None) is not None:
        compat.trust_deepspeed_checkpoints()


def _reduce_dtype(plugin: Any, args: Any, reduce_dtype: str) -> None:
    """accelerate 0.26 reduces FSDP gradients in the compute dtype: bf16 sums of many ranks'
    gradients keep 8 bits of mantissa. Reduce in fp32 unless asked (DeepSpeed alike, through
    communication_data_type). Measured on 2 H200s it did not change the 1.1B loss curve
    noticeably (bench/STRATEGIES.md); the rounding grows with the number of ranks."""
    if not (args.bf16 or args.fp16):
        return
    import torch
    from torch.distributed.fsdp import MixedPrecision

    low = torch.bfloat16 if args.bf16 else torch.float16
    reduce = torch.float32 if reduce_dtype == "fp32" else low
    plugin.mixed_precision_policy = MixedPrecision(
        param_dtype=low, reduce_dtype=reduce, buffer_dtype=low
    )


def _sharded_checkpoints(plugin: Any) -> None:
    import torch
    from torch.distributed.fsdp import (
        ShardedOptimStateDictConfig,
        ShardedStateDictConfig,
        StateDictType,
    )

    # Offloading frees the unsharded copy after moving it to CPU: on a CPU world that copy
    # is the only one, and the save would read freed storage.
    offload = torch.cuda.is_available()
    plugin.state_dict_type = StateDictType.SHARDED_STATE_DICT
    plugin.state_dict_config = ShardedStateDictConfig(offload_to_cpu=offload)
    plugin.optim_state_dict_config = ShardedOptimStateDictConfig(offload_to_cpu=offload)


def save_model(trainer: Any, out: str) -> None:
    """The final model or adapter as a normal HF directory; called on every rank.

    FSDP: one full state dict, gathered on rank 0 (accelerate 0.26's get_state_dict always
    offloads to CPU, which on a CPU world frees the only copy before it is read).
    DeepSpeed: the Trainer gathers ZeRO-3's 16-bit weights (stage3_gather_16bit_weights_on_
    model_save) and peft keeps the adapter's part of them: whole tensors, not empty shards."""
    if getattr(trainer.accelerator.state, "fsdp_plugin", None) is None:
        trainer.save_model(out)
        return
    import torch
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    on_gpu = torch.cuda.is_available()
    config = FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=on_gpu)
    with FSDP.state_dict_type(trainer.model, StateDictType.FULL_STATE_DICT, config):
        state_dict = trainer.model.state_dict()
    if trainer.args.should_save:
        trainer._save(out, state_dict=state_dict)
