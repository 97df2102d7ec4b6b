import os
from pathlib import Path

import pytest

from llmtrain.errors import ConfigError
from llmtrain.train import checkpoints


def make(out: Path, step: int, complete: bool, mtime: float) -> Path:
    ckpt = out / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"x")
    if complete:
        checkpoints.mark_complete(ckpt, {"step": step, "world_size": 1})
    os.utime(ckpt, (mtime, mtime))
    return ckpt


def test_retention_by_step_even_when_mtimes_are_out_of_order(tmp_path: Path) -> None:
    # The newest checkpoint has the oldest mtime, as after a copy or on a network file system.
    for step, mtime in [(100, 5000), (200, 4000), (300, 3000), (400, 1000)]:
        make(tmp_path, step, True, mtime)
    removed = checkpoints.retain(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-100", "checkpoint-200"]
    assert [s for s, _ in checkpoints.all_checkpoints(tmp_path)] == [300, 400]
    assert checkpoints.latest_complete(tmp_path) == tmp_path / "checkpoint-400"


def test_retention_never_goes_below_two_and_keeps_newest_complete(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        make(tmp_path, step, True, 0)
    make(tmp_path, 40, False, 0)  # being written right now
    checkpoints.retain(tmp_path, keep=1)
    assert [s for s, _ in checkpoints.all_checkpoints(tmp_path)] == [20, 30, 40]


def test_incomplete_older_checkpoints_are_cleared_newer_partial_ignored(tmp_path: Path) -> None:
    make(tmp_path, 10, False, 0)
    make(tmp_path, 20, True, 0)
    make(tmp_path, 30, False, 0)
    checkpoints.retain(tmp_path, keep=2)
    assert not (tmp_path / "checkpoint-10").exists()
    assert checkpoints.latest_complete(tmp_path) == tmp_path / "checkpoint-20"
    checkpoints.discard_incomplete_after(tmp_path, tmp_path / "checkpoint-20")
    assert not (tmp_path / "checkpoint-30").exists()


def test_latest_pointer_and_marker_are_written_atomically(tmp_path: Path) -> None:
    ckpt = make(tmp_path, 7, True, 0)
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-7"
    assert checkpoints.read_marker(ckpt)["step"] == 7
    assert not list(tmp_path.rglob(".*.tmp"))


def test_resume_refuses_changed_topology_unless_allowed(tmp_path: Path) -> None:
    ckpt = make(tmp_path, 5, True, 0)
    now = {"world_size": 2, "seed": 42}
    with pytest.raises(ConfigError) as info:
        checkpoints.check_topology(ckpt, now, allow_change=False)
    assert "world_size: 1 -> 2" in info.value.message()
    assert "allow_topology_change" in info.value.message()
    checkpoints.check_topology(ckpt, now, allow_change=True)


def test_resume_never_and_explicit_path(tmp_path: Path) -> None:
    ckpt = make(tmp_path, 5, True, 0)
    assert checkpoints.resume_point(tmp_path, "never") is None
    assert checkpoints.resume_point(tmp_path, str(ckpt)) == ckpt
    assert checkpoints.resume_point(tmp_path, "auto") == ckpt


def test_best_checkpoint_is_recorded_and_kept_when_asked(tmp_path: Path) -> None:
    for step, loss in [(100, 2.0), (200, 1.1), (300, 1.4), (400, None), (500, 1.3)]:
        ckpt = make(tmp_path, step, False, 1000.0)
        facts = {"step": step} if loss is None else {"step": step, "eval_loss": loss}
        checkpoints.mark_complete(ckpt, facts)
    assert checkpoints.record_best(tmp_path) == (tmp_path / "checkpoint-200", 1.1)
    assert (tmp_path / "best").read_text() == "checkpoint-200\n"
    removed = checkpoints.retain(tmp_path, keep=2, keep_best=True)
    assert sorted(p.name for p in removed) == ["checkpoint-100", "checkpoint-300"]
    assert checkpoints.retain(tmp_path, keep=2) == [tmp_path / "checkpoint-200"]
    assert checkpoints.best_complete(tmp_path) == (tmp_path / "checkpoint-500", 1.3)
