"""Lints of the image's files: shellcheck on every shell file, and a parse of apptainer.def
(Apptainer cannot run here, so its definition is checked section by section)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .image_tools import REPO, make_var, need

KNOWN_SECTIONS = {
    "arguments", "setup", "files", "environment", "post", "runscript", "startscript", "test",
    "labels", "help",
}  # fmt: skip
SHELL_SECTIONS = ("environment", "runscript", "test")


def shellcheck(*args: str | Path) -> subprocess.CompletedProcess[str]:
    need(("shellcheck",), "the shell lint")
    return subprocess.run(["shellcheck", "-x", *map(str, args)], capture_output=True, text=True)


def parse_def(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Header keywords and section bodies of an Apptainer definition file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        match = re.match(r"^%(\w+)\s*$", line)
        if match:
            name = match.group(1)
            assert name in KNOWN_SECTIONS, f"unknown section %{name}"
            assert name not in sections, f"section %{name} twice"
            current = sections[name] = []
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.startswith("#"):
            key, sep, value = line.partition(":")
            assert sep, f"header line without 'Keyword: value': {line!r}"
            header[key.strip()] = value.strip()
    return header, sections


@pytest.fixture(scope="module")
def definition() -> tuple[dict[str, str], dict[str, list[str]]]:
    return parse_def((REPO / "apptainer.def").read_text())


def test_every_shell_file_is_shellcheck_clean() -> None:
    files = make_var("SHELL_FILES").split()
    assert "./entrypoint/entrypoint.sh" in files
    assert "./tests/container/standin_base.sh" in files
    proc = shellcheck(*files)
    assert proc.returncode == 0, proc.stdout


def test_shellcheck_is_not_vacuous(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\necho $1\n")
    assert shellcheck(bad).returncode != 0


def test_apptainer_def_bootstraps_from_the_local_image(
    definition: tuple[dict[str, str], dict[str, list[str]]],
) -> None:
    header, sections = definition
    assert header == {"Bootstrap": "{{ BOOTSTRAP }}", "From": "{{ IMAGE }}"}
    defaults = dict(line.strip().split("=", 1) for line in sections["arguments"] if line.strip())
    assert defaults["BOOTSTRAP"] in {"docker-daemon", "docker-archive"}
    used = set(re.findall(r"{{\s*(\w+)\s*}}", (REPO / "apptainer.def").read_text()))
    assert used <= set(defaults), f"template arguments without a default: {used - set(defaults)}"


def test_apptainer_def_runs_the_entrypoint_and_the_build_checks(
    definition: tuple[dict[str, str], dict[str, list[str]]],
) -> None:
    _, sections = definition
    body = {name: "\n".join(lines) for name, lines in sections.items()}
    assert 'exec /opt/llmtrain/entrypoint/entrypoint.sh "$@"' in body["runscript"]
    assert "/opt/llmtrain/entrypoint/entrypoint.sh check" in body["test"]
    exported = re.findall(r"^\s*export (\w+)=", body["environment"], re.MULTILINE)
    assert exported == ["PYTHONNOUSERSITE"]


@pytest.mark.parametrize("section", SHELL_SECTIONS)
def test_apptainer_def_shell_sections_are_shellcheck_clean(
    definition: tuple[dict[str, str], dict[str, list[str]]], section: str, tmp_path: Path
) -> None:
    _, sections = definition
    script = tmp_path / f"{section}.sh"
    script.write_text("#!/bin/sh\n" + "\n".join(sections[section]) + "\n")
    proc = shellcheck(script)
    assert proc.returncode == 0, proc.stdout


def test_apptainer_def_carries_the_dockerfile_labels(
    definition: tuple[dict[str, str], dict[str, list[str]]],
) -> None:
    _, sections = definition
    labels = {line.split()[0] for line in sections["labels"] if line.strip()}
    dockerfile = (REPO / "Dockerfile").read_text()
    assert labels == set(re.findall(r"(org\.opencontainers\.image\.[\w.]+)=", dockerfile))
