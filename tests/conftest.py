"""Shared fixtures, and the rule that CI never counts a skipped tier as passing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
STRICT_MARKERS = ("cluster", "container", "realmodel")
# make test runs on every core (pytest-xdist): each test file is one unit of work on one worker,
# so a module-scoped fixture (a trained model, a Slurm cluster) is made once; these directories
# are one unit each, because their tests share machine-wide state or session-scoped fixtures
# that must be made once (the Slurm cluster's network namespaces, the stand-in base image and its
# tag, the vocab tier's tokenizers). They are the longest units, so they are handed out first
# (--no-loadscope-reorder keeps the collection order). make test itself runs the cluster,
# container and real-model tiers one at a time before the rest (Makefile SERIAL_TIERS).
ONE_UNIT_DIRS = ("container", "launcher", "realmodel", "vocab")


def work_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its ONE_UNIT_DIRS directory, else its file."""
    path = nodeid.split("::", 1)[0]
    parts = path.split("/")
    return parts[1] if len(parts) > 2 and parts[1] in ONE_UNIT_DIRS else path


def pytest_configure(config: pytest.Config) -> None:
    """Tests that wrap a model with peft directly, not through methods.wrap, get finetune's guard
    against a bitsandbytes that is installed but cannot be imported: with PyPI's CUDA torch
    (`make smoke` without TORCH_INDEX), triton 3.x breaks bitsandbytes 0.43's import, and peft
    0.9.0 imports it for any LoRA model (compat.skip_unusable_bitsandbytes)."""
    from llmtrain import compat

    compat.skip_unusable_bitsandbytes()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The ONE_UNIT_DIRS first, each in their order; every worker sorts the same way, as xdist
    requires."""
    rank = {name: i for i, name in enumerate(ONE_UNIT_DIRS)}
    items.sort(key=lambda item: rank.get(work_unit(item.nodeid), len(rank)))  # stable


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scope scheduler with work_unit as the scope. (--dist loadgroup would need its
    xdist_group marks, which pytest-xdist 3.8 applies by renaming item._nodeid, which pytest 9
    no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByWorkUnit(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under CI=true a skipped test of a STRICT_MARKERS tier fails: those tiers must run there."""
    outcome = yield
    report = outcome.get_result()
    if (
        os.environ.get("CI") == "true"
        and report.skipped
        and any(item.get_closest_marker(m) for m in STRICT_MARKERS)
    ):
        report.outcome = "failed"
        report.longrepr = f"CI must run this tier, but it was skipped: {report.longrepr}"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The real `llmtrain` command in a fresh process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "llmtrain.cli", *args],
        capture_output=True, text=True, cwd=cwd or REPO, env=full_env, timeout=timeout,
    )
