"""Distributed strategies: the TrainingArguments that select one (plan.py holds the table of
strategies, the methods each one trains, and the resolution of `auto`), and the few places
where transformers 4.37.2 / accelerate 0.26.0 / peft 0.9.0 / DeepSpeed 0.14 need help to train
and to save a normal HF directory.

single, ddp      one model copy per process (DDP under a launcher)
fsdp             torch FSDP (FSDP1 on the pinned stack, FSDP2 on the current one), full
                 shard, one unit per transformer block, on CPU (gloo) worlds too; checkpoints
                 are sharded, the final save is one full state dict
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
from importlib import resources
from typing import Any

from llmtrain import compat
from llmtrain.config import RunConfig
from llmtrain.errors import ConfigError
from llmtrain.plan import STRATEGIES, RunPlan, launcher_strategy
from llmtrain.train import hf_names

# Derived from the one table in plan.py (which also says which methods each one trains).
DEEPSPEED = {n: s.deepspeed_json for n, s in STRATEGIES.items() if s.deepspeed_json is not None}


def deepspeed_config(name: str) -> dict[str, Any]:
    text = (resources.files("llmtrain") / "deepspeed" / DEEPSPEED[name]).read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def fsdp_settings(block_class: str) -> dict[str, Any]:
    """TrainingArguments.fsdp_config as transformers 4.37.2 reads it: it copies these into
    FSDP_* environment variables, so flags are the strings "true"/"false", prefetch is read
    from the key `fsdp_backward_prefetch`, and limit_all_gathers is read as a bool.
    transformers 5.x runs FSDP2 from them: it reads the block class and leaves the FSDP1 flags
    (prefetch, sync_module_states, use_orig_params, limit_all_gathers) unused."""
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


def training_kwargs(cfg: RunConfig, plan: RunPlan, block_class: str | None) -> dict[str, Any]:
    """The TrainingArguments entries that select the plan's strategy.

    Raises:
        ConfigError: fsdp for a model that names no transformer block class to wrap
            (`_no_split_modules`), exit 64.
    """
    strategy = plan.strategy
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


def start_cpu_group(timeout_s: int) -> None:
    """Start a CPU (gloo) world's process group with the run's collective timeout, before
    TrainingArguments sets up its devices.

    transformers (4.37.2 and 5.x alike) starts the group of a use_cpu world through
    accelerate's PartialState without TrainingArguments.ddp_timeout (its other paths pass it),
    so a dead rank failed the job after torch's 30 minutes, not distributed.timeout_minutes.
    accelerate does not start a second group while one exists: the Trainer's state keeps this
    one."""
    from datetime import timedelta

    from accelerate import PartialState

    PartialState(cpu=True, timeout=timedelta(seconds=timeout_s))


def fsdp_on_cpu(trainer: Any) -> Any:
    """The FSDP plugin for a CPU (gloo) world, or None on an accelerator world.

    accelerate turns FSDP on only for GPU-like worlds and silently runs DDP on a CPU world
    (`AcceleratorState`, accelerate/state.py, 0.26 and still 1.15) while torch's FSDP runs
    there. Set the state as accelerate does on GPUs, so that CPU runs (CI) go through the same
    sharded path, on either stack. A feature of the run rather than a patch: no accelerate
    release to wait for."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return None
    plugin = hf_names.fsdp_plugin(trainer.args)
    # Both shared states: each new AcceleratorState() copies the type from PartialState.
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    return plugin


def prepare_trainer(trainer: Any, cfg: RunConfig) -> None:
    """After the Trainer is built, before it wraps the model: the strategy's missing pieces."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None and launcher_strategy() == "fsdp":
        plugin = fsdp_on_cpu(trainer)
    if plugin is not None:
        if cfg.method.name in ("lora", "qlora") and getattr(plugin, "fsdp_version", 1) == 1:
            # FSDP1 flattens each unit's parameters into one that trains or not as a whole:
            # peft's policy gives every LoRA layer a unit of its own. FSDP2 (the current
            # stack) shards parameter by parameter and keeps the per-block policy.
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
    noticeably (bench/STRATEGIES.md); the rounding grows with the number of ranks.
    FSDP2 (the current stack) takes its own policy type, which casts no buffers; its output
    dtype is the compute dtype, as accelerate 1.x sets it."""
    if not (args.bf16 or args.fp16):
        return
    import torch

    low = torch.bfloat16 if args.bf16 else torch.float16
    reduce = torch.float32 if reduce_dtype == "fp32" else low
    if getattr(plugin, "fsdp_version", 1) == 2:
        # Imported here: torch.distributed.fsdp has it from torch 2.6, the pinned base's is 2.3.
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=low, reduce_dtype=reduce, output_dtype=low
        )
        return
    from torch.distributed.fsdp import MixedPrecision

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
    offloads to CPU, which on a CPU world frees the only copy before it is read). FSDP2 (the
    current stack's) has no FSDP1 state-dict types: accelerate's get_state_dict gathers it
    through torch's distributed-checkpoint state dict, whole tensors on a CPU world too.
    DeepSpeed: the Trainer gathers ZeRO-3's 16-bit weights (stage3_gather_16bit_weights_on_
    model_save) and peft keeps the adapter's part of them: whole tensors, not empty shards."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        trainer.save_model(out)
        return
    if getattr(plugin, "fsdp_version", 1) == 2:
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
        if trainer.args.should_save:
            trainer._save(out, state_dict=state_dict)
        return
    import torch
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    compat.fsdp_no_shard_frozen_views(trainer.model)
    on_gpu = torch.cuda.is_available()
    config = FullStateDictConfig(offload_to_cpu=on_gpu, rank0_only=on_gpu)
    with FSDP.state_dict_type(trainer.model, StateDictType.FULL_STATE_DICT, config):
        state_dict = trainer.model.state_dict()
    if trainer.args.should_save:
        trainer._save(out, state_dict=state_dict)
