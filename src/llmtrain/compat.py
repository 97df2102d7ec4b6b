"""Every patch of the pinned stack (transformers 4.37.2, peft 0.9.0, accelerate 0.26.0,
DeepSpeed 0.14, bitsandbytes 0.43, on torch >= 2.6) in one place, each applied only where the
installed versions need it.

Each shim names the upstream issue or PR it backports or works around and the version from
which it can go; `SHIMS` lists them with their gates, and tests/unit/test_compat.py checks every
gate against the installed versions. On a stack past a shim's bound its gate is false and the
shim does nothing, so one package serves the pinned stack and a current one. Upgrading a pin
means reading this file: a gate that can no longer be true marks a shim to delete.

The module sits on the ground floor (stdlib imports only; each library is imported inside the
shim that patches it), because model/ needs one shim and train/ the rest.

Two fixes of the pinned stack live elsewhere, on purpose, because they are features of the run
rather than patches: train/loss_weighting.py backports transformers 4.46's token-weighted step
loss (`num_items_in_batch`, huggingface/transformers#34191 and #34511; it goes with the 4.46
pin, and LlmtrainTrainer's `_get_train_sampler` with it), and train/checkpoints.py keeps its
own retention by step number because 4.37.2 rotates by mtime (huggingface/transformers#26961).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@functools.cache
def installed(dist: str) -> tuple[int, ...] | None:
    """The release numbers of an installed distribution, e.g. (4, 37, 2); None if absent.

    Pre-release and local tags are dropped: NGC's torch `2.3.0a0+ebedce2` is (2, 3, 0), which
    has what 2.3 has (a plain version comparison would put it below 2.3)."""
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else None


def _below(dist: str, *bound: int) -> bool:
    """`dist` is installed at a release below `bound` (absent: False, nothing to patch)."""
    version = installed(dist)
    return version is not None and version < bound


def at_least(dist: str, *bound: int) -> bool:
    """`dist` is installed at release `bound` or later, tags dropped as in `installed` (absent:
    False)."""
    version = installed(dist)
    return version is not None and version >= bound


# --- the gates: one per shim, true where the installed versions need it -----------------------


def needs_peft_deepspeed_resume() -> bool:
    return _below("transformers", 4, 38)


def needs_trust_deepspeed_checkpoints() -> bool:
    return at_least("torch", 2, 6) and _below("deepspeed", 0, 16)


def needs_trust_own_checkpoints() -> bool:
    return at_least("torch", 2, 6) and _below("transformers", 4, 47)


def needs_drop_empty_param_groups() -> bool:
    return at_least("torch", 2, 10)


def needs_skip_unusable_bitsandbytes() -> bool:
    return _below("bitsandbytes", 0, 45, 1)


def needs_fsdp_no_shard_frozen_views() -> bool:
    # transformers 5.x runs FSDP2 from the same settings (train/strategies.py).
    return _below("transformers", 5)


@dataclass(frozen=True)
class Shim:
    """One patch: what it works around upstream, and the gate that says it is needed here."""

    name: str
    upstream: str
    remove_when: str
    needed: Callable[[], bool]


# --- transformers ------------------------------------------------------------------------------


@contextlib.contextmanager
def peft_deepspeed_resume(trainer: Any) -> Iterator[None]:
    """Resume a PEFT model from a DeepSpeed checkpoint, for the span of train().

    transformers 4.37.2 saves a PEFT model's DeepSpeed checkpoint without the frozen base
    weights (exclude_frozen_parameters) and then loads it strictly: every LoRA/QLoRA resume
    under ZeRO died with "Missing key(s) ... base_layer.weight". Backports
    huggingface/transformers#28746 (load_module_strict=False for PEFT models), released in
    4.38; goes when transformers >= 4.38. A no-op for full models and without DeepSpeed."""
    if not needs_peft_deepspeed_resume():
        yield
        return
    import transformers.trainer as hf_trainer
    from peft import PeftModel

    if not isinstance(trainer.model, PeftModel) or trainer.args.deepspeed is None:
        yield
        return

    def load(engine: Any, checkpoint: str) -> None:
        if not any(name.startswith("global_step") for name in os.listdir(checkpoint)):
            raise ValueError(f"Can't find a valid checkpoint at {checkpoint}")
        load_path, _ = engine.load_checkpoint(
            checkpoint,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            load_module_strict=False,  # the frozen base weights are not in it, by design
        )
        if load_path is None:
            raise ValueError(f"[deepspeed] failed to resume from checkpoint {checkpoint}")

    original = hf_trainer.deepspeed_load_checkpoint
    hf_trainer.deepspeed_load_checkpoint = load
    try:
        yield
    finally:
        hf_trainer.deepspeed_load_checkpoint = original


def trust_own_checkpoints() -> None:
    """Let torch >= 2.6 (weights_only loads by default) read the numpy RNG state that
    transformers 4.37.2 pickles into rng_state*.pth of our own checkpoints.

    Backports huggingface/transformers#34632 (Trainer loads the RNG state under an allowlist
    of numpy globals), released in 4.47; goes when transformers >= 4.47. Needed only from
    torch 2.6, where the weights_only default flipped (pytorch/pytorch#137602)."""
    if not needs_trust_own_checkpoints():
        return
    import _codecs

    import numpy as np
    import torch

    torch.serialization.add_safe_globals(
        [
            np.core.multiarray._reconstruct,  # type: ignore[attr-defined]
            np.ndarray,
            np.dtype,
            _codecs.encode,
            *(type(np.dtype(t)) for t in ("uint32", "int64", "float64")),
        ]
    )


# --- DeepSpeed ---------------------------------------------------------------------------------


def trust_deepspeed_checkpoints() -> None:
    """Let DeepSpeed read its own checkpoints under torch >= 2.6.

    DeepSpeed 0.14 torch.load()s them without weights_only=False; from torch 2.6 that default
    is True (pytorch/pytorch#137602) and refuses the few Python objects it pickles there.
    DeepSpeed passes weights_only=False itself from 0.16.0 (deepspeedai/DeepSpeed#6751);
    goes when deepspeed >= 0.16."""
    if not needs_trust_deepspeed_checkpoints():
        return
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals(
        [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
    )


def drop_empty_param_groups(optimizer: Any) -> None:
    """Remove empty parameter groups from a freshly built optimizer, before its scheduler.

    The Trainer always makes a no-weight-decay group; with LoRA it is empty (no norms or
    biases train). DeepSpeed removes empty groups from the optimizer after the scheduler has
    counted them (deepspeed/runtime/engine.py, since deepspeedai/DeepSpeed#827, still so in
    0.18), and torch's schedulers zip groups with their rates strictly from torch 2.10: LoRA
    with zero2/zero3 died at the first step (seen on torch 2.11; OpenRLHF/OpenRLHF#1234 is the
    same failure). Needed from torch 2.10, harmless without DeepSpeed; no upstream fix yet: it
    goes when the Trainer stops making empty groups or DeepSpeed stops dropping them."""
    if needs_drop_empty_param_groups():
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]


# --- torch's FSDP1 --------------------------------------------------------------------------------


# FSDP root -> its frozen NO_SHARD handles, found once (the root's forward pre-hook holds them).
_FROZEN_NO_SHARD: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()


def fsdp_no_shard_frozen_views(model: Any) -> None:
    """Keep the original parameters of every frozen NO_SHARD FSDP1 unit in `model` (the FSDP
    root) nn.Parameters: restore them now, and, registered on the first call, before every
    forward of the root. Call it before training and before each state dict is taken (a
    checkpoint, the final save); a no-op for any other model.

    FSDP1 with use_orig_params runs a world of one as NO_SHARD. The pre-backward unshard
    leaves a unit's original parameters as plain Tensor views (autograd must track them). The
    post-backward reshard that makes them Parameters again runs for a flat parameter that
    receives a gradient, and for a frozen one only through the reshard-only hook, which fires
    when the unit's inputs require grad (pytorch/pytorch#101982); the catch-all reshard takes a
    NO_SHARD flat parameter for resharded already (its data-pointer check,
    pytorch/pytorch#83956, closed for FSDP2). So with LoRA under peft's wrap policy the root
    (embeddings, lm_head) and the first decoder layer keep Tensors after every backward:
    `Module.state_dict` leaves them out and FSDP's state-dict hook asserts ("FSDP assumes
    ...layers.0...base_layer.weight is in the state_dict"). Worse, the next unshard's
    writeback check (`FlatParamHandle._writeback_orig_params`) sees a changed parameter and
    adopts the Tensor for good, so a restore only at save time comes too late after the
    second micro-batch or step (the GPU suite's one-GPU LoRA FSDP resume, torch 2.11,
    gradient accumulation 4); with tied embeddings the next forward's reshard crashes on the
    shared weight instead. For NO_SHARD, `_use_sharded_views` is exactly the missing reshard.
    The Parameter objects are the optimizer's own. The frozen units are found on the first
    call (llmtrain sets requires_grad before wrapping). The shim goes with transformers 5
    (FSDP2 from the same settings)."""
    if not needs_fsdp_no_shard_frozen_views():
        return
    import torch

    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not isinstance(model, FSDP):
        return
    handles = _FROZEN_NO_SHARD.get(model)
    if handles is None:
        handles = [
            unit._handle
            for unit in FSDP.fsdp_modules(model)
            if unit._handle is not None
            and not unit._handle.uses_sharded_strategy
            and not unit._handle.flat_param.requires_grad
        ]
        _FROZEN_NO_SHARD[model] = handles
        if handles:
            model.register_forward_pre_hook(
                lambda module, args: _frozen_views_as_parameters(handles)
            )
    _frozen_views_as_parameters(handles)


def _frozen_views_as_parameters(handles: list[Any]) -> None:
    import torch

    for handle in handles:
        flat = handle.flat_param
        info = flat._param_infos[0]
        if isinstance(getattr(info.module, info.param_name), torch.nn.Parameter):
            continue  # resharded already (or never unsharded)
        # Defensive: a flat parameter pointing at a low-precision copy (parameter mixed
        # precision) is resharded by FSDP's catch-all, so it never arrives here; views of
        # that copy would turn the weights' dtype.
        if flat.data_ptr() == flat._local_shard.data_ptr():
            handle._use_sharded_views()


# --- bitsandbytes (with peft) ------------------------------------------------------------------


def bitsandbytes_import_error() -> str | None:
    """Why importing bitsandbytes fails here ("ModuleNotFoundError: No module named
    'triton.ops'"), None where it imports. The caller has found it installed (find_spec)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # any import-time failure of bitsandbytes or its triton
        return f"{type(exc).__name__}: {exc}"
    return None


def skip_unusable_bitsandbytes() -> None:
    """Keep peft away from a bitsandbytes that is installed but cannot be imported.

    peft (0.9.0, and still 0.17) decides from `find_spec("bitsandbytes")` alone, then imports
    it while wrapping any LoRA model. bitsandbytes 0.43 imports `triton.ops`, which triton
    3.2+ (shipped with PyPI's CUDA torch wheels) no longer has, so plain LoRA on a CPU machine
    failed with `No module named 'triton.ops'`. Where the import fails, peft is told that
    bitsandbytes is absent; QLoRA still needs a working one (train/checks.py refuses it).
    bitsandbytes dropped `triton.ops` in 0.45.1 (bitsandbytes-foundation/bitsandbytes#1413);
    goes when bitsandbytes >= 0.45.1."""
    if not needs_skip_unusable_bitsandbytes():
        return
    why = bitsandbytes_import_error()
    if why is not None:
        import peft.tuners.lora.model as lora_model

        log.info("bitsandbytes cannot be imported (%s): LoRA without it", why)
        lora_model.is_bnb_available = lambda: False
        lora_model.is_bnb_4bit_available = lambda: False


SHIMS = (
    Shim(
        "peft_deepspeed_resume",
        "huggingface/transformers#28746",
        "transformers >= 4.38",
        needs_peft_deepspeed_resume,
    ),
    Shim(
        "trust_own_checkpoints",
        "huggingface/transformers#34632",
        "transformers >= 4.47 (or torch < 2.6)",
        needs_trust_own_checkpoints,
    ),
    Shim(
        "trust_deepspeed_checkpoints",
        "deepspeedai/DeepSpeed#6751",
        "deepspeed >= 0.16 (or torch < 2.6)",
        needs_trust_deepspeed_checkpoints,
    ),
    Shim(
        "drop_empty_param_groups",
        "deepspeedai/DeepSpeed#827 with torch's strict zip",
        "the Trainer or DeepSpeed stops leaving an empty group (open upstream)",
        needs_drop_empty_param_groups,
    ),
    Shim(
        "fsdp_no_shard_frozen_views",
        "pytorch/pytorch#83956 (FSDP1's NO_SHARD reshard check; closed for FSDP2, no fix)",
        "transformers >= 5 (FSDP2)",
        needs_fsdp_no_shard_frozen_views,
    ),
    Shim(
        "skip_unusable_bitsandbytes",
        "bitsandbytes-foundation/bitsandbytes#1413",
        "bitsandbytes >= 0.45.1",
        needs_skip_unusable_bitsandbytes,
    ),
)
