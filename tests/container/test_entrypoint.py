"""entrypoint/entrypoint.sh dispatch, run on the host (the image runs the same script)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .image_tools import REPO

ENTRYPOINT = REPO / "entrypoint/entrypoint.sh"


def run(
    *args: str, script: Path = ENTRYPOINT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


@pytest.fixture()
def copied(tmp_path: Path) -> Path:
    """entrypoint.sh in its own directory, beside stand-ins for launch.sh (the launchers
    issue's script) and for `llmtrain`, so dispatch is observable without training."""
    (tmp_path / "entrypoint").mkdir()
    script = tmp_path / "entrypoint/entrypoint.sh"
    shutil.copy(ENTRYPOINT, script)
    launch = tmp_path / "entrypoint/launch.sh"
    launch.write_text('#!/usr/bin/env bash\necho "launch.sh got: $*"\n')
    launch.chmod(0o755)
    return script


def test_no_arguments_prints_what_the_image_can_do() -> None:
    proc = run()
    assert proc.returncode == 0
    for verb in ("smoke", "check", "launch", "llmtrain VERB"):
        assert f"  {verb}" in proc.stdout


def test_launch_goes_to_launch_sh(copied: Path) -> None:
    proc = run("launch", "--config", "a b.yaml", script=copied)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "launch.sh got: --config a b.yaml\n"


def test_any_other_command_runs_as_given_with_its_exit_code() -> None:
    proc = run("sh", "-c", 'printf "%s|" "$@"; exit 7', "sh", "x y", "z")
    assert (proc.returncode, proc.stdout) == (7, "x y|z|")


def test_an_unwritable_home_is_replaced_by_a_private_temporary_one(tmp_path: Path) -> None:
    proc = run("sh", "-c", 'echo "$HOME"', env={"HOME": "/nonexistent", "TMPDIR": str(tmp_path)})
    home = tmp_path / f"llmtrain-home-{os.getuid()}"
    assert proc.stdout.strip() == str(home) and home.is_dir()
    assert "HOME was not writable" in proc.stderr


def test_a_writable_home_is_kept(tmp_path: Path) -> None:
    proc = run("sh", "-c", 'echo "$HOME"', env={"HOME": str(tmp_path)})
    assert proc.stdout.strip() == str(tmp_path) and not proc.stderr


def test_smoke_fails_when_the_loss_did_not_fall(copied: Path, tmp_path: Path) -> None:
    # Stand-in for `llmtrain finetune`: writes what a run that learned nothing would.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "llmtrain"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'out="${3#output.dir=}"; mkdir -p "$out"\n'
        "printf '%s\\n' '{\"step\": 10, \"loss\": 2.0}' '{\"step\": 20, \"loss\": 2.5}'"
        ' > "$out/metrics.jsonl"\n'
    )
    fake.chmod(0o755)
    out = tmp_path / "smoke"
    proc = run(
        "smoke",
        script=copied,
        # The check is `python3 -m llmtrain.image_check`: this interpreter's python3 has llmtrain.
        env={
            "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "SMOKE_DIR": str(out),
        },
    )
    assert proc.returncode != 0
    assert "smoke: FAILED: loss did not fall" in proc.stderr
    assert "no adapter at" in proc.stderr
