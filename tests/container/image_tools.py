"""Helpers for the image tests: buildah, make and the tools' availability."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONTAINER_TOOLS = ("buildah", "debootstrap", "mksquashfs", "unsquashfs", "make")


def need(tools: tuple[str, ...], why: str, root: bool = False) -> None:
    """Skip without the tools locally; under CI=true a missing tool is a failure."""
    missing = [t for t in tools if shutil.which(t) is None]
    if root and os.geteuid() != 0:
        missing.append("root")
    if not missing:
        return
    message = f"{why} needs {', '.join(missing)}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def sh(*cmd: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], text=True, check=True, **kwargs)  # type: ignore[call-overload]


def make_var(name: str, *args: str) -> str:
    """A Makefile variable's value, as the Makefile computes it."""
    out = sh(
        "make",
        "-s",
        "-C",
        REPO,
        "--eval",
        f"print-var: ; @echo '$({name})'",
        "print-var",
        *args,
        capture_output=True,
    )
    return out.stdout.strip()


def image_exists(tag: str) -> bool:
    return (
        subprocess.run(
            ["buildah", "inspect", "--type", "image", tag], capture_output=True
        ).returncode
        == 0
    )


@contextlib.contextmanager
def mounted(image: str) -> Iterator[Path]:
    """The image's root file system, read from a throwaway working container."""
    ctr = sh("buildah", "from", "--pull-never", image, capture_output=True).stdout.strip()
    try:
        yield Path(sh("buildah", "mount", ctr, capture_output=True).stdout.strip())
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)


def run_in(image: str, *cmd: str, user: str = "0:0") -> subprocess.CompletedProcess[str]:
    """`buildah run`: the stand-in for `docker run` (which ignores no ENTRYPOINT: pass it)."""
    ctr = sh("buildah", "from", "--pull-never", image, capture_output=True).stdout.strip()
    try:
        return subprocess.run(
            ["buildah", "run", "--isolation", "chroot", "--user", user, ctr, "--", *cmd],
            capture_output=True,
            text=True,
        )
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True)


@dataclass(frozen=True)
class Built:
    tag: str
    base: str
    git_sha: str
    log: str


def make_image(tag: str, base: str, flags: str, git_sha: str) -> Built:
    proc = subprocess.run(
        [
            "make",
            "-C",
            str(REPO),
            "image",
            "CONTAINER_ENGINE=buildah",
            f"IMAGE={tag}",
            f"BASE_IMAGE={base}",
            "BUILD_FLASH_ATTN=0",
            f"GIT_SHA={git_sha}",
            f"BUILD_FLAGS={flags}",
        ],
        capture_output=True,
        text=True,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"make image failed:\n{log[-6000:]}"
    return Built(tag, base, git_sha, log)
