"""GPU presets for the estimator: memory the driver reports and dense peak 16-bit TFLOP/s.

Memory is what `nvidia-smi` / `rocm-smi` report as the device total (a little below the
marketing figure); peak throughput is the dense (no sparsity) bf16 tensor-core figure from
the vendor's data sheet. V100 has no bf16: its entry is the fp16 tensor-core peak.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from llmtrain.errors import ConfigError
from llmtrain.plan import Hardware

MIB = 1024**2


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    peak_tflops: float  # dense bf16 (fp16 on V100), per device as torch sees it
    # Native bf16, and with it flash-attn 2 and cuDNN attention (compute capability 8.0+):
    # a V100 trains in fp16 with SDPA (llmtrain.model.device).
    bf16: bool = True

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 1024**3

    def node(self) -> Hardware:
        """A node of these GPUs as finetune would find it there, with flash_attn where this
        environment has it (the image)."""
        return Hardware.gpu_node(
            flash_attn=importlib.util.find_spec("flash_attn") is not None, bf16=self.bf16
        )


PRESETS: dict[str, Gpu] = {
    "v100-32gb": Gpu("V100 32 GB", 32510 * MIB, 125.0, bf16=False),
    "a100-40gb": Gpu("A100 40 GB", 40536 * MIB, 312.0),
    "a100-80gb": Gpu("A100 80 GB", 81920 * MIB, 312.0),
    # One MI250X is two GCDs; torch and the scheduler see each GCD as a GPU (LUMI-G).
    "mi250x-gcd": Gpu("MI250X GCD 64 GB", 65520 * MIB, 191.5),
    "h100-80gb": Gpu("H100 80 GB", 81559 * MIB, 989.0),
    "h200-141gb": Gpu("H200 141 GB", 143771 * MIB, 989.0),
}

DEFAULT_GPU = "h100"  # what `estimate` and `validate` size for without --gpu

ALIASES = {
    "v100": "v100-32gb",
    "a100": "a100-80gb",
    "a100-40": "a100-40gb",
    "a100-80": "a100-80gb",
    "mi250x": "mi250x-gcd",
    "h100": "h100-80gb",
    "h200": "h200-141gb",
}


def get_gpu(name: str) -> Gpu:
    """The GPU preset called `name` (case-insensitive; aliases such as h200 included).

    Raises:
        ConfigError: no preset or alias has that name (exit 64)."""
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in PRESETS:
        raise ConfigError(
            f"unknown GPU preset {name!r}",
            fix=f"use one of: {', '.join(sorted(PRESETS) + sorted(ALIASES))}",
        )
    return PRESETS[key]


def this_gpu() -> Gpu | None:
    """This machine's GPU as the estimator sizes one: its name, the memory the driver reports,
    native bf16, and the dense peak of its family's preset (V100, A100, H100, H200; else the
    default preset's, used only for time estimates). None without a CUDA GPU."""
    import torch

    from llmtrain.model.device import native_bf16

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    family = next(
        (g for g in PRESETS.values() if g.name.split(" ")[0] in name), get_gpu(DEFAULT_GPU)
    )
    return Gpu(
        name,
        torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory,
        family.peak_tflops,
        bf16=native_bf16(),
    )
