"""LoRA trains where bitsandbytes is installed but cannot be imported: PyPI's CUDA torch brings
triton 3.x, whose missing `triton.ops` breaks bitsandbytes 0.43's import, and peft 0.9.0
imported it for any LoRA model (seen: `make smoke` on a fresh machine failed)."""

from __future__ import annotations

import sys

import pytest

from llmtrain import stack
from llmtrain.config import LoraSection, MethodSection
from llmtrain.model.methods import wrap
from tests.tiny_models import tiny_model


@pytest.mark.skipif(
    stack.is_current(),
    reason="the pinned stack's fault: the current stack locks bitsandbytes >= 0.45.1, which has "
    "no triton.ops import, so compat.skip_unusable_bitsandbytes is gated off there by design",
)
def test_lora_wraps_when_bitsandbytes_is_installed_but_does_not_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import peft.tuners.lora.model as lora_model

    for name in [m for m in sys.modules if m.startswith("bitsandbytes")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    for name in [m for m in sys.modules if m.startswith("peft.tuners.lora.bnb")]:
        monkeypatch.delitem(sys.modules, name)
    # What peft 0.9.0 sees on such a machine: find_spec finds the package.
    monkeypatch.setattr(lora_model, "is_bnb_available", lambda: True)
    monkeypatch.setattr(lora_model, "is_bnb_4bit_available", lambda: True)
    model = wrap(tiny_model("llama"), MethodSection(name="lora"), LoraSection(r=4),
                 gradient_checkpointing=False)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert not lora_model.is_bnb_available()
