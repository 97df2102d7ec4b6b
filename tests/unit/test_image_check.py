"""llmtrain.image_check: what `make smoke` (in .venv) and the image's entrypoint check after a
smoke run, and the image's import check. The run itself is tests/e2e/test_demo.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtrain import image_check
from llmtrain.errors import EXIT_USAGE


def write_run(out: Path, losses: list[float], adapter: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 10 * (i + 1), "loss": loss} for i, loss in enumerate(losses)]
    rows.insert(1, {"step": 10, "eval_loss": 9.0})  # rows without a training loss are skipped
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if adapter:
        (out / "final/adapter").mkdir(parents=True)
        (out / "final/adapter/adapter_model.safetensors").write_bytes(b"x")


def test_a_run_whose_loss_fell_and_saved_its_adapter_passes(tmp_path: Path, capsys) -> None:
    write_run(tmp_path, [2.5, 2.0, 1.25], adapter=True)
    assert image_check.main(["smoke", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("smoke: ok: loss 2.500 (step 10) -> 1.250 (step 30)")


@pytest.mark.parametrize(
    ("losses", "adapter", "expected"),
    [
        ([2.0, 2.5], True, ["loss did not fall"]),
        ([2.0, 2.0], True, ["loss did not fall"]),  # flat is not learning
        ([2.0], True, ["loss did not fall"]),  # one logged step proves nothing
        ([2.5, 2.0], False, ["no adapter at"]),
        ([2.0, 2.5], False, ["loss did not fall", "no adapter at"]),
    ],
)
def test_each_fault_is_named(
    tmp_path: Path, capsys, losses: list[float], adapter: bool, expected: list[str]
) -> None:
    write_run(tmp_path, losses, adapter)
    assert image_check.main(["smoke", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("smoke: FAILED: ")
    assert [e for e in expected if e not in err] == []
    assert len(err.split("; ")) == len(expected)


def test_the_summary_gives_the_exact_match_and_what_the_demo_reaches(
    tmp_path: Path, capsys
) -> None:
    """A newcomer sees the run's exact match beside the demo's expected one, not only the
    README's."""
    write_run(tmp_path, [2.5, 1.0], adapter=True)
    totals = {"rows": 16, "exact_match_before": 0, "exact_match_after": 12, "samples": []}
    (tmp_path / "samples.json").write_text(json.dumps(totals))
    assert image_check.main(["smoke", str(tmp_path)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(
        "; exact match 0/16 before training, 12/16 after (configs/demo.yaml: about 13 of 16 "
        "after, none before)"
    )


def test_a_run_that_never_trained_says_so(tmp_path: Path, capsys) -> None:
    assert image_check.main(["smoke", str(tmp_path / "missing")]) == 1
    assert "no metrics at" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["smoke"], ["imports", "extra"], ["nope"]])
def test_a_wrong_command_line_is_a_usage_error(argv: list[str], capsys) -> None:
    assert image_check.main(argv) == EXIT_USAGE
    assert "python3 -m llmtrain.image_check smoke DIR" in capsys.readouterr().err


def test_the_import_check_fails_on_a_module_that_does_not_import(monkeypatch) -> None:
    monkeypatch.setattr(image_check, "STACK_MODULES", ("json", "llmtrain_no_such_module"))
    with pytest.raises(ImportError, match="llmtrain_no_such_module"):
        image_check.check_imports()


def test_the_import_check_names_each_module_and_its_version(monkeypatch) -> None:
    monkeypatch.setattr(image_check, "STACK_MODULES", ("json", "llmtrain"))
    lines = image_check.check_imports()
    assert "check: import json 2.0.9" in lines
    assert any(line.startswith("check: import llmtrain ") for line in lines)
