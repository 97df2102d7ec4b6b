"""The provenance manifest: what a run ran on, copied into every output directory."""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import llmtrain
from llmtrain import stack

# Written into the image at build time (pip freeze, git sha, base image).
IMAGE_MANIFEST = "/opt/llmtrain/manifest.json"
KEY_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "deepspeed",
    "flash-attn",
    "sentencepiece",
    "tokenizers",
    "bitsandbytes",
    "numpy",
    "safetensors",
    "pydantic",
)
_SECRET = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|CREDENTIAL", re.IGNORECASE)
_ENV_PREFIXES = (
    "SLURM_",
    "PBS_",
    "NCCL_",
    "GLOO_",
    "TORCH_",
    "HF_",
    "CUDA_",
    "LLMTRAIN_",
    "MASTER_",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "OMP_",
)


def is_secret(name: str) -> bool:
    return bool(_SECRET.search(name))


def masked_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment variables that shape a run, with secrets masked."""
    env = dict(os.environ if env is None else env)
    return {
        k: ("***" if is_secret(k) else v)
        for k, v in sorted(env.items())
        if k.startswith(_ENV_PREFIXES) or is_secret(k)
    }


def command_output(cmd: list[str], timeout: float) -> str | None:
    """A tool's stripped stdout, or None when it is missing, fails or hangs."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _git_sha() -> str | None:
    root = Path(llmtrain.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    return command_output(["git", "-C", str(root), "rev-parse", "HEAD"], timeout=5)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def image_manifest() -> dict[str, Any] | None:
    path = Path(os.environ.get("LLMTRAIN_IMAGE_MANIFEST", IMAGE_MANIFEST))
    if not path.is_file():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def build(**run: Any) -> dict[str, Any]:
    """The manifest of this environment; `run` adds run facts (world size, seed, ...)."""
    import torch

    cuda = torch.cuda.is_available()
    image = image_manifest()
    manifest: dict[str, Any] = {
        "llmtrain": llmtrain.__version__,
        # Inside the image there is no .git: the sha recorded at build time stands in.
        "git_sha": _git_sha() or (image or {}).get("git_sha"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # pinned (transformers 4.37.2, the default image) or current (make image STACK=current)
        "stack": stack.name(),
        "packages": package_versions(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "env": masked_env(),
        "image": image,
    }
    manifest.update(run)
    return manifest


def write(path: Path, manifest: dict[str, Any]) -> None:
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
