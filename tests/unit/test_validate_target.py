"""What validate's memory line says it was checked against."""

from __future__ import annotations

import pytest

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
