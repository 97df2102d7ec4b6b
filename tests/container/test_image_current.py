"""The current stack's image (`make image STACK=current`) built with buildah on the CI stand-in
base: the current lock installs through the same Dockerfile, and the image says it is current.

Stand-ins as in test_image.py: buildah for docker, the debootstrap base with CPU torch for NGC
25.10 (Python 3.11 instead of 3.12, and no CUDA, so no flash-attn: BUILD_FLASH_ATTN=0). What the
pinned image's tests check that does not depend on the lock (smoke, labels, squashfs, rebuild)
is not repeated here.
"""

from __future__ import annotations

import json

import pytest

from .image_tools import Built, lock_pins_for, make_var, read_manifest, run_in, torch_record

pytestmark = pytest.mark.container

LOCK = "requirements/lock-current.txt"


def test_build_runs_the_import_test_and_pip_check(current_image: Built) -> None:
    log = current_image.log
    # make image STACK=current handed the Dockerfile the current lock (not a stale default).
    assert f"--build-arg 'LOCK={LOCK}'" in log
    assert "--build-arg 'LLMTRAIN_STACK=current'" in log
    pins = lock_pins_for(read_manifest(current_image.tag)["python"], LOCK)
    # The import test ran against the current lock's releases, not the pinned ones.
    for module in ("transformers", "peft", "accelerate", "datasets", "deepspeed"):
        assert f"check: import {module} {pins[module]}" in log
    for module in ("torch", "sentencepiece", "llmtrain"):
        assert f"check: import {module} " in log
    assert "image_packages: pip check: ok" in log
    assert "check: llmtrain env ok" in log


def test_torch_is_exactly_the_base_torch(current_image: Built) -> None:
    assert torch_record(current_image.tag) == torch_record(current_image.base)


def test_manifest_names_the_current_stack_and_its_lock_versions(current_image: Built) -> None:
    manifest = read_manifest(current_image.tag)
    assert manifest["stack"] == "current"
    packages = manifest["packages"]
    pins = lock_pins_for(manifest["python"], LOCK)
    # What a user of the current stack relies on, named so that a failure is plain.
    for name in ("transformers", "peft", "accelerate", "trl", "datasets", "deepspeed"):
        assert packages[name] == pins[name], name
    for name, version in pins.items():
        assert packages.get(name) == version, name
    assert packages["torch"] == manifest["base_packages"]["torch"]
    assert packages["llmtrain"] == manifest["llmtrain_version"] == make_var("VERSION")
    assert manifest["git_sha"] == current_image.git_sha
    assert manifest["flash_attn_built"] is False


def test_llmtrain_env_names_the_current_stack(current_image: Built) -> None:
    proc = run_in(current_image.tag, "llmtrain", "env")
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)
    # Both views: what the image was built as, and what the running package finds installed.
    assert env["image"]["stack"] == "current"
    assert env["stack"] == "current"
    pins = lock_pins_for(env["image"]["python"], LOCK)
    assert env["packages"]["transformers"] == pins["transformers"]
    assert env["packages"]["torch"] == env["image"]["base_packages"]["torch"]
