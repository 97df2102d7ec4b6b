"""The real Dockerfile built with buildah on the CI stand-in base, then used as a user would.

Stand-ins, because CI machines cannot run the real thing: buildah for docker (no engine),
`buildah run` for `docker run`, a debootstrap base with CPU torch for nvcr.io's NGC image,
mksquashfs of the image's rootfs for `enroot import` (which packs the same way).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .image_tools import (
    REPO,
    SITE,
    Built,
    lock_pins_for,
    make_image,
    make_var,
    mounted,
    read_manifest,
    run_in,
    sh,
    torch_record,
)

pytestmark = pytest.mark.container


def test_build_runs_the_import_test_and_pip_check(built_image: Built) -> None:
    log = built_image.log
    for module in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "datasets",
        "deepspeed",
        "sentencepiece",
        "llmtrain",
    ):
        assert f"check: import {module} " in log
    assert "image_packages: pip check: ok" in log
    assert "check: llmtrain env ok" in log
    # BUILD_FLASH_ATTN=0: no flash_attn in the image. (Asked of the image, not of the log: the
    # flash-attn layer comes early and may come from the build cache, printing nothing.)
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('flash_attn') is not None)"
    assert run_in(built_image.tag, "python3", "-c", probe).returncode == 0


def test_torch_is_exactly_the_base_torch(built_image: Built) -> None:
    base_name, base_record = torch_record(built_image.base)
    name, record = torch_record(built_image.tag)
    assert (name, record) == (base_name, base_record)
    version = run_in(built_image.tag, "python", "-c", "import torch; print(torch.__version__)")
    assert version.returncode == 0, version.stderr
    assert f"torch-{version.stdout.strip()}.dist-info" == name


def test_manifest_records_every_version_the_lock_and_the_base_gave(built_image: Built) -> None:
    manifest = read_manifest(built_image.tag)
    packages = manifest["packages"]
    for name, version in lock_pins_for(manifest["python"], "requirements/lock.txt").items():
        assert packages.get(name) == version, name
    assert packages["torch"] == manifest["base_packages"]["torch"]
    assert packages["llmtrain"] == manifest["llmtrain_version"] == make_var("VERSION")
    assert manifest["stack"] == "pinned"
    assert manifest["git_sha"] == built_image.git_sha
    assert manifest["base_image"] == built_image.base
    assert manifest["base_digest"].startswith("sha256:")
    assert manifest["flash_attn_built"] is False


def test_llmtrain_env_reads_the_image_manifest(built_image: Built) -> None:
    proc = run_in(built_image.tag, "llmtrain", "env")
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)
    assert env["image"]["git_sha"] == built_image.git_sha
    assert env["image"]["stack"] == env["stack"] == "pinned"
    assert env["packages"]["torch"] == env["image"]["packages"]["torch"]


def test_image_configs_resolve_including_the_deepspeed_links(built_image: Built) -> None:
    """configs/deepspeed/*.json are links into the package's copies; in the image they must
    still resolve, since `accelerate launch` and users read them from /opt/llmtrain/configs."""
    script = (
        "import json, pathlib; c = pathlib.Path('/opt/llmtrain/configs'); "
        "print(sorted(json.loads(p.read_text())['zero_optimization']['stage'] "
        "for p in (c / 'deepspeed').glob('*.json')))"
    )
    proc = run_in(built_image.tag, "python3", "-c", script)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[2, 3, 3]"


def test_labels_env_and_layers_carry_no_tunables_or_secrets(built_image: Built) -> None:
    config = json.loads(
        sh("buildah", "inspect", "--type", "image", built_image.tag, capture_output=True).stdout
    )["OCIv1"]
    base = json.loads(
        sh("buildah", "inspect", "--type", "image", built_image.base, capture_output=True).stdout
    )["OCIv1"]
    labels = config["config"]["Labels"]
    assert labels["org.opencontainers.image.revision"] == built_image.git_sha
    assert labels["org.opencontainers.image.version"] == make_var("VERSION")
    assert labels["org.opencontainers.image.base.name"] == built_image.base
    assert labels["org.opencontainers.image.base.digest"].startswith("sha256:")
    added = set(config["config"]["Env"]) - set(base["config"].get("Env", []))
    assert added == {"PYTHONNOUSERSITE=1"}
    assert config["config"]["Entrypoint"] == ["/opt/llmtrain/entrypoint/entrypoint.sh"]
    history = " ".join(h.get("created_by", "") for h in config["history"])
    assert not re.search(r"HF_|NCCL_|MASTER_|TOKEN|SECRET|PASSWORD", history)
    with mounted(built_image.tag) as root:
        # The CI build's mounts (wheelhouse, pip.conf) must not be committed.
        assert not (root / "etc/pip.conf").is_file() or not (root / "etc/pip.conf").read_text()
        assert not any((root / "wheels").glob("*"))


def test_smoke_in_the_image_as_an_arbitrary_uid(built_image: Built, tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    out.mkdir()
    out.chmod(0o777)  # the job directory a scheduler would give uid 12345
    proc = subprocess.run(
        [
            "make",
            "-C",
            str(REPO),
            "smoke",
            "CONTAINER_ENGINE=buildah",
            f"IMAGE={built_image.tag}",
            "RUN_FLAGS=--isolation chroot",
            "SMOKE_USER=12345:12345",
            f"SMOKE_DIR={out}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "buildah run --isolation chroot --user '12345:12345'" in proc.stdout
    assert "HOME was not writable" in proc.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) >= 2 and losses[-1] < losses[0] / 2, losses
    adapter = out / "final/adapter/adapter_model.safetensors"
    assert adapter.stat().st_size > 1000 and adapter.stat().st_uid == 12345


def test_rootfs_packs_into_squashfs_as_enroot_does(built_image: Built, tmp_path: Path) -> None:
    sqsh = tmp_path / "llmtrain.sqsh"
    options = make_var("SQSH_OPTIONS").split()
    with mounted(built_image.tag) as root:
        manifest = (root / "opt/llmtrain/manifest.json").read_bytes()
        # enroot import: mksquashfs ROOTFS OUT -all-root $ENROOT_SQUASH_OPTIONS
        sh(
            "mksquashfs",
            root,
            sqsh,
            "-all-root",
            "-noappend",
            "-no-progress",
            "-quiet",
            *options,
            capture_output=True,
        )
    listing = sh("unsquashfs", "-l", sqsh, capture_output=True).stdout
    assert "squashfs-root/opt/llmtrain/entrypoint/entrypoint.sh" in listing
    assert f"squashfs-root/{SITE}/torch/__init__.py" in listing
    assert (
        sh(
            "unsquashfs", "-cat", sqsh, "opt/llmtrain/manifest.json", capture_output=True
        ).stdout.encode()
        == manifest
    )
    stats = sh("unsquashfs", "-s", sqsh, capture_output=True).stdout
    assert "Compression zstd" in stats and "Block size 1048576" in stats


def test_a_lock_that_would_change_torch_fails_the_build(
    built_image: Built, build_flags: str, tmp_path: Path
) -> None:
    context = tmp_path / "context"
    context.mkdir()
    for item in (
        "Dockerfile",
        ".dockerignore",
        "pyproject.toml",
        "src",
        "entrypoint",
        "configs",
        "requirements",
    ):
        copy = shutil.copytree if (REPO / item).is_dir() else shutil.copy
        copy(REPO / item, context / item)
    lock = context / "requirements/lock.txt"
    lock.write_text(lock.read_text() + "torch==2.12.0 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    proc = subprocess.run(
        [
            "buildah",
            "bud",
            "--layers",
            "--force-rm",
            *build_flags.split(),
            "--build-arg",
            f"BASE_IMAGE={built_image.base}",
            "--build-arg",
            "BUILD_FLASH_ATTN=0",
            "--tag",
            "localhost/llmtrain-test:must-fail",
            str(context),
        ],
        capture_output=True,
        text=True,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "the lock would change base packages it must not own" in log
    assert re.search(r"torch: base 2\.13\.0\S*, lock 2\.12\.0", log), log[-3000:]


def test_rebuild_without_cache_installs_the_same_versions(
    built_image: Built, build_flags: str
) -> None:
    tag = built_image.tag + "-again"
    again = make_image(tag, built_image.base, build_flags + " --no-cache", built_image.git_sha)
    try:
        assert "Using cache" not in again.log
        assert read_manifest(tag) == read_manifest(built_image.tag)
    finally:
        subprocess.run(["buildah", "rmi", tag], capture_output=True)
