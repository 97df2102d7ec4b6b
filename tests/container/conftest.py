"""Fixtures for the image tests: the stand-in base, an offline wheelhouse, the built image.

The real Dockerfile is built with buildah (the stand-in for docker, which has no engine on CI
machines) against a stand-in for the NGC base (debootstrap + Python 3.11 + CPU torch), because
nvcr.io cannot be reached and there is no GPU. The base is built once per session; set
LLMTRAIN_STANDIN_BASE=TAG to keep and reuse it across runs, LLMTRAIN_TEST_CACHE=DIR to keep its
rootfs and the wheelhouse.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .image_tools import CONTAINER_TOOLS, HERE, REPO, Built, image_exists, make_image, need, sh


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    kept = os.environ.get("LLMTRAIN_TEST_CACHE")
    path = Path(kept) if kept else tmp_path_factory.mktemp("image-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def standin_base(cache_dir: Path) -> str:
    need(CONTAINER_TOOLS, "the stand-in base image", root=True)
    tag = os.environ.get("LLMTRAIN_STANDIN_BASE", "localhost/llmtrain-standin-base:ci")
    if not image_exists(tag):
        sh(HERE / "standin_base.sh", tag, cache_dir / "base")
    return tag


def download_lock(lock: str, path: Path) -> None:
    """Fetch a lock's files into the wheelhouse, checked against its hashes. Files already there
    (pins both locks share) are not fetched again."""
    need(("pip",), "the wheelhouse")
    version = sh("pip", "--version", capture_output=True).stdout
    assert "(python 3.11)" in version, f"the host pip must run Python 3.11: {version}"
    sh("pip", "download", "--quiet", "--no-deps", "--require-hashes", "-r", REPO / lock, "-d", path)


@pytest.fixture(scope="session")
def wheelhouse(cache_dir: Path) -> Path:
    """The lock's files fetched once on the host, so builds run offline: no PyPI TLS inside the
    build, and a rebuild cannot see a different index. The host's pip picks the files, so its
    Python must be the stand-in's (Debian bookworm: 3.11)."""
    path = cache_dir / "wheels"
    download_lock("requirements/lock.txt", path)
    return path


@pytest.fixture(scope="session")
def build_flags(wheelhouse: Path, cache_dir: Path) -> str:
    """buildah flags for CI: chroot isolation, and pip pointed at the wheelhouse through a
    mounted /etc/pip.conf (mounts are not committed to the image)."""
    pip_conf = cache_dir / "pip.conf"
    pip_conf.write_text("[global]\nno-index = true\nfind-links = /wheels\n")
    return (
        f"--isolation chroot --network host -v {wheelhouse}:/wheels:ro "
        f"-v {pip_conf}:/etc/pip.conf:ro"
    )


@pytest.fixture(scope="session")
def built_image(standin_base: str, build_flags: str) -> Iterator[Built]:
    tag = f"localhost/llmtrain-test:{uuid.uuid4().hex[:8]}"
    built = make_image(tag, standin_base, build_flags, "0123456789abcdef-test")
    yield built
    subprocess.run(["buildah", "rmi", tag], capture_output=True)


@pytest.fixture(scope="session")
def current_image(standin_base: str, wheelhouse: Path, build_flags: str) -> Iterator[Built]:
    """`make image STACK=current` on the same stand-in base: the current lock resolved from the
    same offline wheelhouse (its files added beside the pinned lock's) and installed by the same
    Dockerfile. Only the base differs from a user's build (no NGC 25.10 here: Python 3.11 and CPU
    torch instead of 3.12 and CUDA torch; the lock is universal for both)."""
    download_lock("requirements/lock-current.txt", wheelhouse)
    tag = f"localhost/llmtrain-test:current-{uuid.uuid4().hex[:8]}"
    built = make_image(tag, standin_base, build_flags, "0123456789abcdef-test", stack="current")
    yield built
    subprocess.run(["buildah", "rmi", tag], capture_output=True)
