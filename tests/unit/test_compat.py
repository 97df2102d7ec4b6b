"""compat: each shim of the pinned stack is applied exactly where the installed versions need
it, and is a no-op on a stack past its bound (a current transformers 5.x stack)."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import sys
import types
from collections.abc import Callable

import pytest

from llmtrain import compat

PINNED = {
    "torch": (2, 13, 0),
    "transformers": (4, 37, 2),
    "peft": (0, 9, 0),
    "accelerate": (0, 26, 0),
    "deepspeed": (0, 14, 5),
    "bitsandbytes": (0, 43, 3),
}
CURRENT = {
    "torch": (2, 9, 1),
    "transformers": (5, 0, 0),
    "peft": (0, 17, 1),
    "accelerate": (1, 10, 1),
    "deepspeed": (0, 17, 5),
    "bitsandbytes": (0, 47, 0),
}
# The bound of each gate, written out independently of compat: needed for these versions.
BOUNDS: dict[str, Callable[[Callable[[str], tuple[int, ...] | None]], bool]] = {
    "peft_deepspeed_resume": lambda v: _lt(v("transformers"), (4, 38)),
    "trust_own_checkpoints": lambda v: _ge(v("torch"), (2, 6)) and _lt(v("transformers"), (4, 47)),
    "trust_deepspeed_checkpoints": lambda v: (
        _ge(v("torch"), (2, 6)) and _lt(v("deepspeed"), (0, 16))
    ),
    "drop_empty_param_groups": lambda v: _ge(v("torch"), (2, 10)),
    "skip_unusable_bitsandbytes": lambda v: _lt(v("bitsandbytes"), (0, 45, 1)),
    "fsdp_no_shard_frozen_views": lambda v: _lt(v("transformers"), (5,)),
}


def _lt(version: tuple[int, ...] | None, bound: tuple[int, ...]) -> bool:
    return version is not None and version < bound


def _ge(version: tuple[int, ...] | None, bound: tuple[int, ...]) -> bool:
    return version is not None and version >= bound


def _metadata_release(dist: str) -> tuple[int, ...] | None:
    try:
        text = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    numbers = re.match(r"[0-9.]*[0-9]", text)
    return tuple(int(x) for x in numbers.group(0).split(".")) if numbers else None


def _fake(monkeypatch: pytest.MonkeyPatch, stack: dict[str, tuple[int, ...]]) -> None:
    monkeypatch.setattr(compat, "installed", lambda dist: stack.get(dist))


def test_every_shim_is_listed_once_with_its_upstream_reference_and_bound() -> None:
    shims = {s.name: s for s in compat.SHIMS}
    assert len(shims) == len(compat.SHIMS)
    assert set(shims) == set(BOUNDS)
    for name, shim in shims.items():
        doc = inspect.getdoc(getattr(compat, name)) or ""
        assert shim.upstream.split(" ")[0] in doc or "no upstream fix" in doc.lower(), name
        assert re.search(r"goes (when|with)", doc), f"{name}: its docstring says when it can go"


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_gate_is_right_for_the_installed_versions(name: str) -> None:
    shim = next(s for s in compat.SHIMS if s.name == name)
    assert shim.needed() is BOUNDS[name](_metadata_release)


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_gate_on_the_pinned_stack_is_on(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, PINNED)
    assert next(s for s in compat.SHIMS if s.name == name).needed()


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_gate_on_a_current_stack_is_off(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, CURRENT)
    assert not next(s for s in compat.SHIMS if s.name == name).needed()


def test_gates_sit_exactly_at_their_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake(monkeypatch, {**PINNED, "transformers": (4, 38, 0), "deepspeed": (0, 16, 0)})
    assert not compat.needs_peft_deepspeed_resume()
    assert compat.needs_trust_own_checkpoints()  # 4.38 still lacks 4.47's allowlist
    assert not compat.needs_trust_deepspeed_checkpoints()
    _fake(monkeypatch, {**PINNED, "torch": (2, 5, 1)})  # weights_only still defaults to False
    assert not compat.needs_trust_own_checkpoints()
    assert not compat.needs_trust_deepspeed_checkpoints()
    assert not compat.needs_drop_empty_param_groups()
    _fake(monkeypatch, {**PINNED, "bitsandbytes": (0, 45, 1)})
    assert not compat.needs_skip_unusable_bitsandbytes()
    _fake(monkeypatch, {k: v for k, v in PINNED.items() if k != "deepspeed"})
    assert not compat.needs_trust_deepspeed_checkpoints()  # nothing to patch


@pytest.mark.parametrize(
    ("text", "release"),
    [("2.3.0a0+ebedce2", (2, 3, 0)), ("2.13.0+cpu", (2, 13, 0)), ("4.37.2", (4, 37, 2))],
)
def test_installed_reads_release_numbers_without_tags(
    text: str, release: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """NGC's torch 2.3.0a0 has what 2.3 has: pre-release and local tags are dropped."""
    compat.installed.cache_clear()
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: text)
    try:
        assert compat.installed("torch") == release
    finally:
        compat.installed.cache_clear()


def test_installed_is_none_for_an_absent_distribution() -> None:
    assert compat.installed("llmtrain-no-such-distribution") is None


def test_shims_do_nothing_where_their_gate_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import transformers.trainer as hf_trainer
    from peft import PeftModel

    _fake(monkeypatch, CURRENT)
    added: list[object] = []
    monkeypatch.setattr(torch.serialization, "add_safe_globals", added.extend)
    compat.trust_own_checkpoints()
    compat.trust_deepspeed_checkpoints()
    assert added == []

    optimizer = types.SimpleNamespace(param_groups=[{"params": [1]}, {"params": []}])
    compat.drop_empty_param_groups(optimizer)
    assert len(optimizer.param_groups) == 2

    original = hf_trainer.deepspeed_load_checkpoint
    peft_trainer = types.SimpleNamespace(
        model=PeftModel.__new__(PeftModel), args=types.SimpleNamespace(deepspeed={})
    )
    with compat.peft_deepspeed_resume(peft_trainer):
        assert hf_trainer.deepspeed_load_checkpoint is original

    import peft.tuners.lora.model as lora_model

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # its import would fail
    before = lora_model.is_bnb_available
    compat.skip_unusable_bitsandbytes()
    assert lora_model.is_bnb_available is before


def test_shims_apply_where_their_gate_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    _fake(monkeypatch, PINNED)
    added: list[object] = []
    monkeypatch.setattr(torch.serialization, "add_safe_globals", added.extend)
    compat.trust_own_checkpoints()
    assert any(getattr(g, "__name__", "") == "ndarray" for g in added)
    optimizer = types.SimpleNamespace(param_groups=[{"params": [1]}, {"params": []}])
    compat.drop_empty_param_groups(optimizer)
    assert optimizer.param_groups == [{"params": [1]}]
