"""The Makefile's commands for the tools that cannot run here (docker, apptainer, enroot), checked
with a dry run (`make -n`): exactly what a user on a login node would run."""

from __future__ import annotations

import re
import subprocess

import pytest

from .image_tools import REPO, make_var, need

# Fixed inputs, so the commands are exact and nothing is inspected on this machine.
FIXED = [
    "IMAGE=llmtrain:v1",
    "BASE_IMAGE=nvcr.io/nvidia/pytorch:24.04-py3",
    "BASE_DIGEST=sha256:feed",
    "GIT_SHA=0123abc",
    "OUT_DIR=/shared/containers",
]


def dry_run(target: str, *args: str) -> list[str]:
    """`make -n TARGET`: its commands, continuation lines joined, whitespace collapsed."""
    need(("make",), "the Makefile dry runs")
    out = subprocess.run(
        ["make", "-n", "-C", str(REPO), "--no-print-directory", target, *FIXED, *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [" ".join(c.split()) for c in re.sub(r"\\\n", " ", out).splitlines() if c.strip()]


@pytest.fixture(scope="module")
def version() -> str:
    return make_var("VERSION")


def test_image_with_docker(version: str) -> None:
    assert dry_run("image", "CONTAINER_ENGINE=docker", "MAX_JOBS=8") == [
        "docker build --file Dockerfile --tag 'llmtrain:v1' "
        "--build-arg 'BASE_IMAGE=nvcr.io/nvidia/pytorch:24.04-py3' "
        "--build-arg 'BASE_DIGEST=sha256:feed' --build-arg 'GIT_SHA=0123abc' "
        f"--build-arg 'LLMTRAIN_VERSION={version}' --build-arg 'BUILD_FLASH_ATTN=1' "
        "--build-arg 'MAX_JOBS=8' --build-arg 'DS_BUILD_OPS=0' "
        "--build-arg 'LOCK=requirements/lock.txt' --build-arg 'LLMTRAIN_STACK=pinned' "
        "--build-arg 'FLASH_ATTN_VERSION=2.5.8' ."
    ]


def test_current_stack_selects_its_base_lock_and_outputs() -> None:
    """STACK=current: the current NGC base, lock-current.txt, its own image, sif and sqsh."""
    current = ["STACK=current", "CONTAINER_ENGINE=docker"]
    (image,) = dry_run("image", *current, "BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3")
    assert "--build-arg 'LOCK=requirements/lock-current.txt'" in image
    assert "--build-arg 'LLMTRAIN_STACK=current'" in image
    assert make_var("BASE_IMAGE", "STACK=current") == "nvcr.io/nvidia/pytorch:25.10-py3"
    assert make_var("IMAGE", "STACK=current") == "llmtrain:current"
    assert make_var("SQSH", "STACK=current") == f"{REPO}/out/llmtrain-current.sqsh"
    assert make_var("SIF", "STACK=current") == f"{REPO}/out/llmtrain-current.sif"
    assert make_var("VENV", "STACK=current") == ".venv-current"


def test_image_with_podman_and_buildah_differ_only_in_the_builder() -> None:
    docker = dry_run("image", "CONTAINER_ENGINE=docker")[0]
    assert dry_run("image", "CONTAINER_ENGINE=podman") == [
        docker.replace("docker build", "podman build")
    ]
    assert dry_run("image", "CONTAINER_ENGINE=buildah") == [
        docker.replace("docker build", "buildah bud --layers")
    ]


def test_sif_from_the_docker_daemon(version: str) -> None:
    assert dry_run("sif", "CONTAINER_ENGINE=docker") == [
        "mkdir -p '/shared/containers'",
        "apptainer build --force --build-arg BOOTSTRAP=docker-daemon "
        "--build-arg 'IMAGE=llmtrain:v1' "
        f"--build-arg 'GIT_SHA=0123abc' --build-arg 'VERSION={version}' "
        "--build-arg 'BASE_IMAGE=nvcr.io/nvidia/pytorch:24.04-py3' "
        "--build-arg 'BASE_DIGEST=sha256:feed' '/shared/containers/llmtrain.sif' apptainer.def",
    ]


def test_sif_from_a_podman_archive(version: str) -> None:
    archive = "/shared/containers/llmtrain.docker.tar"
    assert dry_run("sif", "CONTAINER_ENGINE=podman") == [
        "mkdir -p '/shared/containers'",
        f"rm -f '{archive}'",
        f"podman push 'llmtrain:v1' 'docker-archive:{archive}:llmtrain:v1'",
        "apptainer build --force --build-arg BOOTSTRAP=docker-archive "
        f"--build-arg 'IMAGE={archive}' --build-arg 'GIT_SHA=0123abc' "
        f"--build-arg 'VERSION={version}' "
        "--build-arg 'BASE_IMAGE=nvcr.io/nvidia/pytorch:24.04-py3' "
        "--build-arg 'BASE_DIGEST=sha256:feed' '/shared/containers/llmtrain.sif' apptainer.def",
        f"rm -f '{archive}'",
    ]


@pytest.mark.parametrize(("engine", "uri"), [("docker", "dockerd"), ("podman", "podman")])
def test_sqsh_with_enroot_zstd_and_an_absolute_path(engine: str, uri: str) -> None:
    assert dry_run("sqsh", f"CONTAINER_ENGINE={engine}") == [
        "mkdir -p '/shared/containers'",
        "rm -f '/shared/containers/llmtrain.sqsh'",
        "ENROOT_SQUASH_OPTIONS='-comp zstd -Xcompression-level 3 -b 1M' enroot import "
        f"--output '/shared/containers/llmtrain.sqsh' '{uri}://llmtrain:v1'",
    ]


def test_sqsh_with_buildah_says_what_to_use() -> None:
    proc = subprocess.run(
        ["make", "-n", "-C", str(REPO), "sqsh", "CONTAINER_ENGINE=buildah", *FIXED],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "CONTAINER_ENGINE=podman" in proc.stderr


def test_default_sqsh_path_is_absolute() -> None:
    assert make_var("SQSH") == f"{REPO}/out/llmtrain.sqsh"


def test_smoke_with_docker_passes_the_flags_nccl_needs() -> None:
    commands = dry_run(
        "smoke",
        "CONTAINER_ENGINE=docker",
        "IMAGE_EXISTS=yes",
        "GPU_FLAGS=--gpus all",
        "SMOKE_USER=1000:1000",
        "SMOKE_DIR=/scratch/smoke",
    )
    assert commands == [
        "mkdir -p '/scratch/smoke'",
        "docker run --rm --ipc=host --ulimit memlock=-1 --gpus all --user '1000:1000' "
        "--volume '/scratch/smoke:/smoke' --env SMOKE_DIR=/smoke 'llmtrain:v1' smoke",
    ]


def test_smoke_without_the_image_runs_in_the_venv() -> None:
    commands = dry_run("smoke", "CONTAINER_ENGINE=docker", "IMAGE_EXISTS=", "SMOKE_DIR=/s")
    # On a fresh machine the venv is made from the lock first, then the job runs in it and its
    # result is checked.
    assert commands[-2:] == [
        ".venv/bin/llmtrain finetune configs/demo.yaml 'output.dir=/s'",
        ".venv/bin/python -m llmtrain.image_check smoke '/s'",
    ]
    assert commands[:-2] == dry_run("venv")


def test_no_engine_is_an_error_naming_the_choices() -> None:
    proc = subprocess.run(
        ["make", "-n", "-C", str(REPO), "image", "CONTAINER_ENGINE=", *FIXED],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "no container engine" in proc.stderr and "CONTAINER_ENGINE" in proc.stderr


def test_lock_is_the_one_command_that_wrote_each_lock() -> None:
    pinned, current = dry_run("lock")
    for command, lock in ((pinned, "lock.txt"), (current, "lock-current.txt")):
        header = (REPO / "requirements" / lock).read_text().splitlines()[1]
        assert command == "uv " + header.lstrip("# ").removeprefix("uv ")


def test_venv_installs_torch_only_when_missing_then_the_lock_then_the_package() -> None:
    assert dry_run("venv", "VENV=/tmp/v") == [
        "test -x /tmp/v/bin/python || python3 -m venv /tmp/v",
        "/tmp/v/bin/python -c 'import torch' 2>/dev/null || /tmp/v/bin/pip install 'torch==2.13.0'",
        "/tmp/v/bin/python -c 'import wheel, setuptools' 2>/dev/null "
        "|| /tmp/v/bin/pip install setuptools wheel",
        "DS_BUILD_OPS=0 /tmp/v/bin/pip install --no-deps --require-hashes --no-build-isolation "
        "-r requirements/lock.txt",
        "/tmp/v/bin/pip install --no-deps --no-build-isolation -e .",
    ]


def test_help_lists_every_target() -> None:
    out = subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory", "help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for target in ("image", "sif", "sqsh", "smoke", "venv", "test", "lock", "lint", "bench",
                   "embedded", "smollm2"):
        assert re.search(rf"^  {target} +\S", out, re.MULTILINE), target
