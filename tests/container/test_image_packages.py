"""The build's package guard (requirements/image_packages.py), run against this virtualenv's real
pip: what it keeps as constraints, and that it names the package when the base would change."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from .image_tools import REPO

SCRIPT = REPO / "requirements/image_packages.py"
HEADER = (
    "#    uv pip compile pyproject.toml --no-emit-package torch --no-emit-package sympy"
    " --generate-hashes -o requirements/lock.txt\n"
)


def guard(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True
    )


def write_lock(path: Path, pins: str) -> Path:
    path.write_text(HEADER + pins)
    return path


def test_constraints_keep_what_the_lock_does_not_own(tmp_path: Path) -> None:
    base = tmp_path / "base-packages.txt"
    base.write_text("torch==2.3.0a0+6ddf5cf\nsympy==1.12\nnumpy==1.24.4\napex==0.1\n")
    lock = write_lock(
        tmp_path / "lock.txt",
        "numpy==1.26.4 \\\n    --hash=sha256:aa\n"
        "Typing_Extensions==4.9.0 ; python_full_version >= '3.11' \\\n    --hash=sha256:bb\n",
    )
    out = tmp_path / "constraints.txt"
    proc = guard("constraints", "--lock", lock, "--base-packages", base, "--out", out)
    assert proc.returncode == 0, proc.stderr
    kept = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    assert kept == ["apex==0.1", "sympy==1.12", "torch==2.3.0a0+6ddf5cf"]


def test_a_lock_pinning_a_base_package_it_must_not_own_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base-packages.txt"
    base.write_text("torch==2.3.0a0+6ddf5cf\nsympy==1.12\n")
    lock = write_lock(
        tmp_path / "lock.txt",
        "torch==2.3.0 \\\n    --hash=sha256:aa\nsympy==1.12 \\\n    --hash=sha256:bb\n",
    )
    proc = guard(
        "constraints", "--lock", lock, "--base-packages", base, "--out", tmp_path / "c.txt"
    )
    assert proc.returncode == 1
    assert "torch: base 2.3.0a0+6ddf5cf, lock 2.3.0" in proc.stderr
    assert "sympy" not in proc.stderr  # pinned at the base's own version: no change


def test_verify_names_a_changed_base_package(tmp_path: Path) -> None:
    pytest_version = metadata.version("pytest")
    constraints = tmp_path / "c.txt"
    constraints.write_text(f"# kept\npytest=={pytest_version}\npluggy==0.0.1\nnot-there==1.0\n")
    proc = guard("verify", constraints)
    assert proc.returncode == 1
    assert f"pluggy: base 0.0.1 -> {metadata.version('pluggy')}" in proc.stderr
    assert "not-there: base 1.0 -> removed" in proc.stderr
    assert "pytest:" not in proc.stderr
    constraints.write_text(f"pytest=={pytest_version}\n")
    assert guard("verify", constraints).returncode == 0


def test_manifest_lists_every_installed_version(tmp_path: Path) -> None:
    base = tmp_path / "base-packages.txt"
    base.write_text("torch==2.13.0+cpu\n")
    out = tmp_path / "manifest.json"
    proc = guard(
        "manifest", "--out", out, "--base-packages", base, "--base-image", "nvcr.io/x:1",
        "--git-sha", "abc", "--flash-attn", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(out.read_text())
    assert manifest["packages"]["pytest"] == metadata.version("pytest")
    assert manifest["packages"]["typing-extensions"] == metadata.version("typing_extensions")
    assert manifest["base_packages"] == {"torch": "2.13.0+cpu"}
    assert manifest["flash_attn_built"] is True and manifest["deepspeed_ops_prebuilt"] is False
    assert (manifest["git_sha"], manifest["base_image"]) == ("abc", "nvcr.io/x:1")


def test_pip_check_tolerates_a_missing_triton_only_on_a_base_without_one(
    tmp_path: Path, monkeypatch
) -> None:
    """liger-kernel requires triton, which the lock leaves to the base's torch: a CPU stand-in
    base has none (llmtrain then keeps its own loss); a base that had triton must keep it."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("image_packages", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    missing = "liger-kernel 0.8.5 requires triton, which is not installed."
    other = "liger-kernel 0.8.5 requires torch, which is not installed."
    known, base = tmp_path / "base-pip-check.txt", tmp_path / "base-packages.txt"
    known.write_text("")
    args = argparse.Namespace(base=known, base_packages=base)
    monkeypatch.setattr(module, "pip_check_problems", lambda: [missing])
    base.write_text("torch==2.13.0+cpu\n")
    assert module.pip_check(args) == 0
    base.write_text("torch==2.3.0a0\ntriton==2.2.0\n")
    assert module.pip_check(args) == 1
    monkeypatch.setattr(module, "pip_check_problems", lambda: [other])
    base.write_text("torch==2.13.0+cpu\n")
    assert module.pip_check(args) == 1
