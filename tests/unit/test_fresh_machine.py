"""The README's first commands on a fresh machine: no container engine on PATH, or a docker
client whose daemon does not answer. Only the image targets (image, sif, sqsh) may need an
engine; every other target must parse and run, and `make smoke` must run in .venv.

The Makefile is run with a PATH holding only the tools such a machine has (make, bash,
coreutils, sed, grep, awk, git, python3), as symlinks in a temporary directory."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_TOOLS = ("make", "bash", "sh", "sed", "grep", "awk", "git", "python3")
COREUTILS = (
    "basename", "cat", "chmod", "cp", "cut", "date", "dirname", "echo", "env", "false", "head",
    "id", "ln", "ls", "mkdir", "mktemp", "mv", "printf", "readlink", "rm", "sort", "tail",
    "test", "touch", "tr", "true", "uname", "wc",
)
ENGINES = ("docker", "podman", "buildah")
# A docker client with no daemon behind it: every command fails as the real client does.
DAEMONLESS_DOCKER = """#!/bin/sh
echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2
exit 1
"""


def fresh_bin(tmp_path: Path, docker_client: bool) -> Path:
    """A bin directory with the fresh machine's tools and no engine (or a daemonless docker)."""
    if shutil.which("make") is None:
        pytest.skip("the Makefile tests need make")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in BASE_TOOLS + COREUTILS:
        found = shutil.which(tool)
        if found is None:
            continue  # a shell builtin stands in (echo, printf, test, true, false)
        (bin_dir / tool).symlink_to(Path(found).resolve())
    if docker_client:
        docker = bin_dir / "docker"
        docker.write_text(DAEMONLESS_DOCKER)
        docker.chmod(0o755)
    assert not any(
        shutil.which(engine, path=str(bin_dir)) for engine in ENGINES if engine != "docker"
    )
    return bin_dir


def make(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # A clean environment: no CONTAINER_ENGINE or MAKEFLAGS from the caller.
    env = {"PATH": str(bin_dir), "HOME": str(bin_dir.parent), "LC_ALL": "C"}
    return subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )


def commands(out: str) -> list[str]:
    """The commands `make -n` printed, continuation lines joined, whitespace collapsed."""
    return [" ".join(c.split()) for c in re.sub(r"\\\n", " ", out).splitlines() if c.strip()]


@pytest.fixture(params=[False, True], ids=["no-engine", "docker-without-daemon"])
def bin_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return fresh_bin(tmp_path, docker_client=request.param)


def test_help_says_no_engine_was_found(bin_dir: Path) -> None:
    proc = make(bin_dir, "help")
    assert proc.returncode == 0, proc.stderr
    assert "(engine: none found)" in proc.stdout
    assert re.search(r"^  smoke +\S", proc.stdout, re.MULTILINE)


def test_help_needs_nothing_but_make(tmp_path: Path) -> None:
    """`make help`, the default goal, lists every `target: ## text` line of the Makefile with
    make alone on PATH (the recipes' shell is /bin/bash by path): no grep, awk or python3."""
    if shutil.which("make") is None:
        pytest.skip("the Makefile tests need make")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "make").symlink_to(Path(str(shutil.which("make"))).resolve())
    proc = make(bin_dir)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    documented = re.findall(
        r"^([a-z0-9]+):.*?## (.*)$", (REPO / "Makefile").read_text(), re.MULTILINE
    )
    assert len(documented) > 10
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("usage: make TARGET")
    listed = lines[1 : next(i for i, line in enumerate(lines) if line.startswith("variables:"))]
    assert listed == [f"  {target:<9} {text}" for target, text in documented]


@pytest.mark.parametrize("target", ["venv", "test", "lint", "lock", "bench", "embedded"])
def test_targets_without_an_image_parse_and_run(bin_dir: Path, target: str) -> None:
    proc = make(bin_dir, "-n", target)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "container engine" not in proc.stderr


def test_smoke_runs_in_the_venv(bin_dir: Path) -> None:
    proc = make(bin_dir, "-n", "smoke", "SMOKE_DIR=/s")
    assert proc.returncode == 0, proc.stderr
    venv = make(bin_dir, "-n", "venv")
    assert venv.returncode == 0, venv.stderr
    smoke = commands(proc.stdout)
    # The venv is made from the lock first, then the job runs in it and its result is checked
    # (the image's entrypoint runs the same check); no engine is called.
    assert smoke[-2:] == [
        ".venv/bin/llmtrain finetune configs/demo.yaml 'output.dir=/s'",
        ".venv/bin/python -m llmtrain.image_check smoke '/s'",
    ]
    assert smoke[:-2] == commands(venv.stdout)
    assert not any(re.search(r"\b(docker|podman|buildah)\b", c) for c in smoke)


def test_torch_comes_from_pypi_unless_an_index_is_named(bin_dir: Path) -> None:
    """README: a machine without a GPU can take torch's CPU build instead of PyPI's CUDA one."""
    pypi = make(bin_dir, "-n", "venv")
    assert "|| .venv/bin/pip install 'torch==2.13.0'\n" in pypi.stdout
    cpu = make(bin_dir, "-n", "smoke", "TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    assert cpu.returncode == 0, cpu.stderr
    assert (
        "|| .venv/bin/pip install 'torch==2.13.0' --index-url "
        "'https://download.pytorch.org/whl/cpu'\n"
    ) in cpu.stdout


def test_test_target_makes_the_venv_then_runs_pytest(bin_dir: Path) -> None:
    proc = make(bin_dir, "-n", "test")
    assert proc.returncode == 0, proc.stderr
    # every tier: the machine-wide ones one at a time, then the rest one test file per core
    assert commands(proc.stdout)[-2:] == [
        '.venv/bin/pytest -m "cluster or container or realmodel"',
        '.venv/bin/pytest -n auto --no-loadscope-reorder -m "not (cluster or container or '
        'realmodel)"',
    ]


@pytest.mark.parametrize("target", ["image", "sif", "sqsh"])
def test_image_targets_fail_naming_the_fix(bin_dir: Path, target: str) -> None:
    proc = make(bin_dir, "-n", target)
    assert proc.returncode != 0
    assert "no container engine: install docker, podman or buildah" in proc.stderr
    assert "set CONTAINER_ENGINE" in proc.stderr
    assert proc.stdout == ""  # nothing was run (or printed) before the error


def test_ci_runs_make_smoke_before_installing_an_engine() -> None:
    """CI walks the fresh-machine path: `make smoke` runs before buildah is installed."""
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    smoke = lines.index("make smoke")
    installs = [i for i, line in enumerate(lines) if "apt-get install" in line]
    engine = next(i for i, line in enumerate(lines) if re.search(r"\bbuildah\b", line)
                  and not line.startswith("#"))
    assert installs[0] < smoke < engine
    assert not any(re.search(r"\b(buildah|podman|docker)\b", line)
                   for line in lines[:smoke] if not line.startswith("#"))
