"""Helpers for the image tests: buildah, make and the tools' availability."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import Marker

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


def make_image(tag: str, base: str, flags: str, git_sha: str, stack: str = "pinned") -> Built:
    """`make image STACK=stack` as a user runs it, on the stand-in base (no CUDA: no flash-attn)."""
    proc = subprocess.run(
        [
            "make",
            "-C",
            str(REPO),
            "image",
            f"STACK={stack}",
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


SITE = "opt/venv/lib/python3.11/site-packages"  # the stand-in base's environment


def read_manifest(image: str) -> dict:
    with mounted(image) as root:
        return json.loads((root / "opt/llmtrain/manifest.json").read_text())


def torch_record(image: str) -> tuple[str, bytes]:
    with mounted(image) as root:
        (info,) = (root / SITE).glob("torch-*.dist-info")
        return info.name, (info / "RECORD").read_bytes()


def lock_pins_for(python: str, lock: str) -> dict[str, str]:
    """The lock's pins that apply to this Python on Linux x86_64 (markers evaluated)."""
    env = {
        "python_full_version": python,
        "python_version": python.rsplit(".", 1)[0],
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "platform_python_implementation": "CPython",
    }
    pins = {}
    for line in (REPO / lock).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)\s*(?:;([^\\]*))?", line)
        if match and (not match.group(3) or Marker(match.group(3)).evaluate(env)):
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins
