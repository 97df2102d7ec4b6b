"""llmtrain.model.device on GPUs this machine does not have: torch's answers are patched to a
V100's, a T4's, an A100's and an H200's (no GPU in CI), and torch.cuda.is_bf16_supported to
True everywhere, as torch 2.3+ answers on a V100 or T4 (it emulates bf16): device must not use
it."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import types

import pytest
import torch

from llmtrain.errors import ConfigError
from llmtrain.model import device
from llmtrain.plan import Hardware, choose_attention

GPUS = {
    "Tesla V100-SXM2-32GB": (7, 0),
    "Tesla T4": (7, 5),
    "NVIDIA A100-SXM4-80GB": (8, 0),
    "NVIDIA H200": (9, 0),
}


def _gpu(monkeypatch: pytest.MonkeyPatch, name: str, *, flash_attn: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: GPUS[name])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.version, "hip", None)
    found = importlib.util.find_spec
    installed = importlib.machinery.ModuleSpec("flash_attn", None) if flash_attn else None
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: installed if n == "flash_attn" else found(n, *a)
    )


@pytest.mark.parametrize("name", GPUS)
def test_bf16_and_flash_attn_need_compute_capability_8(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    _gpu(monkeypatch, name, flash_attn=True)
    ampere = GPUS[name] >= (8, 0)
    assert device.this_machine() == Hardware(cuda=True, bf16=ampere, flash_attn=ampere)
    assert device.describe() == f"{name} (compute capability {GPUS[name][0]}.{GPUS[name][1]})"


def test_flash_attn_needs_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpu(monkeypatch, "NVIDIA H200", flash_attn=False)
    assert device.this_machine() == Hardware(cuda=True, bf16=True, flash_attn=False)


def test_a_model_loads_in_bf16_only_where_the_gpu_computes_in_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """model.dtype=auto (generate, merge, the post-run samples): fp16 on a V100, as training's
    frozen base there, not bf16 emulated in fp32 nor fp32 at twice the memory."""
    from llmtrain.config import ModelSection
    from llmtrain.model.load import pick_dtype

    model = ModelSection(path="embedded:tiny-llama")
    _gpu(monkeypatch, "Tesla V100-SXM2-32GB", flash_attn=True)
    assert pick_dtype(model) == torch.float16
    _gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", flash_attn=True)
    assert pick_dtype(model) == torch.bfloat16


def test_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None)
    assert device.this_machine() == Hardware.cpu()
    assert device.describe() == "no CUDA GPU"


def test_qlora_inference_computes_in_fp16_where_the_gpu_has_no_bf16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """generate and finetune's samples load a QLoRA base with the compute dtype it trained in
    (plan.compute_dtype): fp16 on a V100, not bf16 that torch emulates in fp32."""
    from llmtrain.config import ModelSection
    from llmtrain.model import export

    seen: list[torch.dtype] = []

    class Loaded(Exception):
        pass

    def load_model(cfg: object, **kwargs: object) -> None:
        seen.append(kwargs["extra"]["quantization_config"].bnb_4bit_compute_dtype)  # type: ignore[index]
        raise Loaded

    monkeypatch.setattr(export, "load_model", load_model)
    for name, expected in [
        ("Tesla V100-SXM2-32GB", torch.float16),
        ("NVIDIA H200", torch.bfloat16),
    ]:
        _gpu(monkeypatch, name, flash_attn=False)
        with pytest.raises(Loaded):
            export.load_for_inference(
                ModelSection(path="embedded:tiny-llama"), None, quantized=True
            )
        assert seen[-1] == expected


# torch on ROCm: gcnArchName with feature flags; get_device_capability answers 9.x for CDNA.
ROCM_GPUS = {
    "AMD Instinct MI50": ("gfx906:sramecc+:xnack-", False, False),
    "AMD Instinct MI100": ("gfx908:sramecc+:xnack-", True, False),
    "AMD Instinct MI250X": ("gfx90a:sramecc+:xnack-", True, True),
    "AMD Instinct MI300X": ("gfx942:sramecc+:xnack-", True, True),
}


@pytest.mark.parametrize("name", ROCM_GPUS)
def test_rocm_gpus_by_gfx_architecture(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """An MI50 has no bf16 matrix instructions (torch emulates bf16 there) and flash-attn 2's
    ROCm backend starts at MI200: neither may be planned from 'a ROCm GPU' alone."""
    arch, bf16, flash = ROCM_GPUS[name]
    _gpu(monkeypatch, "NVIDIA H200", flash_attn=True)  # capability 9.0, as ROCm reports
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    # torch 2.3's signature: the device has no default (it has from 2.6).
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(gcnArchName=arch)
    )
    assert device.this_machine() == Hardware(
        cuda=True, bf16=bf16, flash_attn=flash, flash_attn_arch=flash
    )
    assert device.describe() == f"{name} ({arch.split(':')[0]})"
    if not flash:  # an explicit choice is refused with the reason (the package is installed)
        why = "older than MI200" if not bf16 else "does not run on this ROCm GPU"
        with pytest.raises(ConfigError, match=why):
            choose_attention("flash_attention_2", None, device.this_machine())
