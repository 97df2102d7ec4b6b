"""What this machine's GPU runs natively: bf16 and flash-attn 2 need an NVIDIA GPU of compute
capability 8.0 or later (A100, H100; not V100 or T4). On ROCm, where torch reports compute
capability 9.x for every CDNA GPU, the question is the gfx architecture: bf16 matrix
instructions from MI100 (gfx908; not MI50/MI60, gfx906), flash-attn 2's ROCm backend on MI200,
MI300 and MI350 (gfx90a, gfx94x, gfx950; its README's list for the composable-kernel backend:
its Triton backend, which also runs on RDNA, is not counted, so auto takes SDPA there and an
explicit flash_attention_2 is refused).

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
# gfx architecture prefixes: CDNA 1-4 and RDNA 3-4 compute in bf16; flash-attn 2 runs on CDNA 2-4.
ROCM_BF16 = ("gfx908", "gfx90a", "gfx94", "gfx95", "gfx11", "gfx12")
ROCM_FLASH_ATTN = ("gfx90a", "gfx94", "gfx95")


def rocm_arch() -> str | None:
    """This process's ROCm GPU's gfx architecture ('gfx90a'; torch's gcnArchName without its
    feature flags); None on CUDA or without a GPU."""
    if torch.version.hip is None or not torch.cuda.is_available():
        return None
    # The device argument: torch before 2.6 (the image's 2.3) has no default for it.
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    return str(properties.gcnArchName).split(":")[0]


def capability() -> tuple[int, int] | None:
    """This process's current CUDA device's compute capability (major, minor); None without a
    CUDA GPU."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return major, minor


def native_bf16() -> bool:
    """A GPU here computes in bf16 natively: NVIDIA compute capability 8.0 or later, or a ROCm
    GPU of ROCM_BF16."""
    if torch.version.hip is not None:
        arch = rocm_arch()
        return arch is not None and arch.startswith(ROCM_BF16)
    found = capability()
    return found is not None and found >= AMPERE


def flash_attn_arch() -> bool:
    """The GPU's architecture runs flash-attn 2 where it has bf16: False only for a ROCm GPU
    outside ROCM_FLASH_ATTN (NVIDIA GPUs are judged by native_bf16)."""
    if torch.version.hip is None:
        return True
    arch = rocm_arch()
    return arch is not None and arch.startswith(ROCM_FLASH_ATTN)


def flash_attn_runs() -> bool:
    """flash_attn imports and a GPU here runs flash-attn 2: NVIDIA Ampere or later, or a ROCm
    GPU of ROCM_FLASH_ATTN."""
    installed = importlib.util.find_spec("flash_attn") is not None
    return installed and native_bf16() and flash_attn_arch()


def describe() -> str:
    """This GPU as an error message names it: 'Tesla V100-SXM2-32GB (compute capability 7.0)';
    'no CUDA GPU' without one."""
    found = capability()
    if found is None:
        return "no CUDA GPU"
    arch = rocm_arch()
    if arch is not None:
        return f"{torch.cuda.get_device_name()} ({arch})"
    return f"{torch.cuda.get_device_name()} (compute capability {found[0]}.{found[1]})"


def this_machine() -> Hardware:
    """What this process's machine has, for its RunPlan and finetune's checks."""
    return Hardware(
        cuda=torch.cuda.is_available(),
        bf16=native_bf16(),
        flash_attn=flash_attn_runs(),
        flash_attn_arch=flash_attn_arch(),
    )

