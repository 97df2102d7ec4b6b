"""What this machine's GPU runs natively: bf16 and flash-attn 2 need an NVIDIA GPU of compute
capability 8.0 or later (A100, H100; not V100 or T4), or a ROCm GPU.

`torch.cuda.is_bf16_supported()` is not that question: from torch 2.3 it answers True on a V100
or T4 too, where bf16 is emulated in fp32 (pytorch/pytorch#124996, #148322), many times slower
than fp16. transformers 4.37.2's `is_flash_attn_2_available()` checks the package and CUDA only;
flash-attn 2 itself raises "FlashAttention only supports Ampere GPUs or newer" at the first
forward on such a GPU.
"""

from __future__ import annotations

import importlib.util

import torch

from llmtrain.plan import Hardware

AMPERE = (8, 0)  # the compute capability of bf16 tensor cores, flash-attn 2 and cuDNN attention


def capability() -> tuple[int, int] | None:
    """This process's current CUDA device's compute capability (major, minor); None without a
    CUDA GPU."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return major, minor


def native_bf16() -> bool:
    """A GPU here computes in bf16 natively: ROCm, or NVIDIA compute capability 8.0 or later."""
    if torch.version.hip is not None:
        return torch.cuda.is_available()
    found = capability()
    return found is not None and found >= AMPERE


def flash_attn_runs() -> bool:
    """flash_attn imports and a GPU here runs flash-attn 2 (as native_bf16: Ampere or later,
    or ROCm)."""
    return importlib.util.find_spec("flash_attn") is not None and native_bf16()


def describe() -> str:
    """This GPU as an error message names it: 'Tesla V100-SXM2-32GB (compute capability 7.0)';
    'no CUDA GPU' without one."""
    found = capability()
    if found is None:
        return "no CUDA GPU"
    return f"{torch.cuda.get_device_name()} (compute capability {found[0]}.{found[1]})"


def this_machine() -> Hardware:
    """What this process's machine has, for its RunPlan and finetune's checks."""
    return Hardware(
        cuda=torch.cuda.is_available(), bf16=native_bf16(), flash_attn=flash_attn_runs()
    )

