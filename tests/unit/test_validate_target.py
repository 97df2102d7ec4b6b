"""What validate's memory line says it was checked against."""

from __future__ import annotations

import types

import pytest
import torch

from llmtrain import cli
from tests.conftest import REPO


@pytest.mark.parametrize("gpu", [None, "h200"])
def test_memory_verdict_names_the_preset_and_says_when_it_was_not_asked_for(
    gpu: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run on a CPU without --gpu, "fits on H100" alone read as a claim about an H100 the user
    never named (found by a newcomer's first validate)."""
    argv = ["validate", str(REPO / "configs" / "demo.yaml"), *(["--gpu", gpu] if gpu else [])]
    assert cli.main(argv) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("memory per GPU")]
    if gpu is None:
        assert "fits on H100" in line and "(no --gpu: the default preset h100," in line
    else:
        assert "fits on H200" in line and "no --gpu" not in line


def test_on_a_gpu_node_without_gpu_memory_and_plan_are_this_gpus(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """validate on a V100 node (torch patched to answer as one; no GPU in CI) without --gpu:
    the plan and the memory verdict are this GPU's (fp16, its 32 GiB), not an H100's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulated
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda *a: types.SimpleNamespace(
            total_memory=34089730048)
    )
    monkeypatch.setattr(torch.version, "hip", None)
    assert cli.main(["validate", str(REPO / "configs" / "demo.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "target: this machine (Tesla V100-SXM2-32GB (compute capability 7.0))" in out
    assert "  precision: fp16 (auto: the GPU has no bf16)" in out
    (line,) = [x for x in out if x.startswith("memory per GPU")]
    assert "fits on Tesla V100-SXM2-32GB (32 GiB)" in line and "no --gpu" not in line
