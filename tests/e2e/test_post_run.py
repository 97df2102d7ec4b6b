"""After the final save nothing turns a finished run into a (requeued) failure: a merge or
sample generation that fails is a warning with the command that redoes it, and exit 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmtrain import cli
from llmtrain.train import post_run
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_failing_merge_and_generation_after_the_final_save_exit_0_with_warnings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("planted post-run failure")

    monkeypatch.setattr(post_run, "merge", broken)
    monkeypatch.setattr(post_run, "generate", broken)
    out = tmp_path / "out"
    caplog.set_level("WARNING")
    rc = cli.main(["finetune", str(REPO / "configs" / "lora.yaml"), f"output.dir={out}",
                   "training.max_steps=2", "generation.samples=2", "output.merge=true"])
    assert rc == 0
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "final" / "merged").exists()
    assert not (out / "generations.jsonl").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    merge_warning = next(w for w in warnings if w.startswith("merge after training failed"))
    assert "planted post-run failure" in merge_warning and "exit 0" in merge_warning
    assert f"llmtrain merge --base embedded:tiny-llama --adapter {out / 'final' / 'adapter'}" \
        in merge_warning
    gen_warning = next(w for w in warnings if w.startswith("sample generation after training"))
    # the merge failed, so the samples would have come from the adapter
    assert f"--adapter {out / 'final' / 'adapter'} --out {out / 'generations.jsonl'}" in gen_warning
