"""Distributed strategies as TrainingArguments settings, and which combinations can work."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any

from llmtrain.config import RunConfig
from llmtrain.errors import ConfigError

DEEPSPEED = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}


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


def resolve(cfg: RunConfig, world: World) -> str:
    strategy = cfg.distributed.strategy
    return ("ddp" if world.distributed else "single") if strategy == "auto" else strategy


def check(cfg: RunConfig) -> None:
    """Refuse the combinations the pinned stack cannot run (peft 0.9.0, accelerate 0.26.0)."""
    strategy, method = cfg.distributed.strategy, cfg.method.name
    if method == "qlora" and strategy in ("fsdp", "zero3", "zero3_offload"):
        raise ConfigError(
            f"method qlora with distributed.strategy={strategy} is not possible with peft 0.9.0 "
            "(4-bit weights cannot be sharded)",
            "use distributed.strategy=ddp (or auto), or method lora with fsdp/zero3",
        )
    if method == "layers" and strategy in ("fsdp", "zero3", "zero3_offload"):
        raise ConfigError(
            f"method layers with distributed.strategy={strategy}: sharding a model that is "
            "mostly frozen gains little and mixes frozen and trained parameters in one shard",
            "use distributed.strategy=ddp or zero2",
        )


def deepspeed_config(name: str) -> dict[str, Any]:
    text = (resources.files("llmtrain") / "deepspeed" / DEEPSPEED[name]).read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def training_kwargs(cfg: RunConfig, world: World, block_class: str | None) -> dict[str, Any]:
    """The TrainingArguments entries that select the strategy."""
    strategy = resolve(cfg, world)
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
        kwargs["fsdp_config"] = {
            "transformer_layer_cls_to_wrap": [block_class],
            "use_orig_params": cfg.method.name != "full",
            "sync_module_states": True,
            "limit_all_gathers": True,
            "forward_prefetch": False,
            "backward_prefetch": "backward_pre",
        }
    elif strategy in DEEPSPEED:
        kwargs["deepspeed"] = deepspeed_config(strategy)
    return kwargs
