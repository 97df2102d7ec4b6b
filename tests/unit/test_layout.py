"""The package's floors (README "Layout"): a module imports only from floors below its own or
from its own folder; a verb never imports another verb; kernels never pull in the data
reader (`datasets`); a verb module imports no heavy library until its verb runs."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "llmtrain"

# Top-level unit (a folder or a module of src/llmtrain) -> floor; higher floors stand above.
FLOORS: dict[str, int] = {
    "__init__": -1,  # the package root: its version only
    "errors": 0, "labels": 0, "stack": 0,  # stack: which HF stack is installed (pinned or current)
    "compat": 1, "manifest": 1,  # pinned-stack shims (each gated by version); provenance
    "config": 2,
    "plan": 3,  # the config resolved for this world and hardware: config and errors only
    "kernels": 4, "vocab": 4,
    "model": 5, "data": 5,
    "train": 6, "sizing": 6,
    "verbs": 7,
    # the entry points: the verbs; launch.sh's worker wrapper; the smoke and image checks
    "cli": 8, "launch": 8, "image_check": 8,
    "__main__": 9,
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every llmtrain module `path` imports, at module level or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "llmtrain":
                out.update(f"llmtrain.{alias.name}" for alias in node.names)
            elif node.module.startswith("llmtrain."):
                out.add(node.module)
                out.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "llmtrain")
    return out


def test_every_module_has_a_floor() -> None:
    units = {_unit(name) for name in _modules()}
    assert units - FLOORS.keys() == set(), "give each new top-level module or folder a floor"


def test_no_module_imports_a_higher_or_equal_floor() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for target in _imports(path):
            if target not in modules:
                continue  # `from llmtrain.x import name`: the name, not a module
            a, b = _unit(name), _unit(target)
            if a != b and FLOORS[a] <= FLOORS[b]:
                wrong.append(f"{name} (floor {FLOORS[a]}) imports {target} (floor {FLOORS[b]})")
    assert wrong == []


def test_a_verb_never_imports_another_verb() -> None:
    modules = _modules()
    wrong = [
        f"{name} imports {target}"
        for name, path in modules.items()
        if name.startswith("llmtrain.verbs.")
        for target in _imports(path)
        if target.startswith("llmtrain.verbs.") and target in modules and target != name
    ]
    assert wrong == []


def test_the_layers_are_not_flat_again() -> None:
    """Only the ground, config, plan and the entry points (cli, and the two that shell scripts
    call: launch, image_check) sit beside the folders."""
    flat = {p.stem for p in PACKAGE.glob("*.py")}
    assert flat <= {"__init__", "__main__", "cli", "compat", "config", "errors", "image_check",
                    "labels", "launch", "manifest", "plan", "stack"}


def _loaded_after_import(module: str, heavy: tuple[str, ...]) -> list[str]:
    code = (
        f"import sys, {module}\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return out.split()


@pytest.mark.parametrize("name", sorted(n for n in _modules() if n.startswith("llmtrain.kernels.")))
def test_a_kernel_does_not_pull_in_the_data_reader(name: str) -> None:
    assert _loaded_after_import(name, ("datasets",)) == []


def test_verb_modules_import_no_heavy_library_before_their_verb_runs() -> None:
    """`llmtrain VERB --help` imports the verb's module; torch alone takes seconds to import."""
    verbs = sorted(n for n in _modules() if n.startswith("llmtrain.verbs."))
    code = (
        "import sys\n"
        f"for m in {verbs!r}: __import__(m)\n"
        "__import__('llmtrain.cli')\n"
        "print(' '.join(m for m in ('torch', 'transformers', 'datasets', 'peft', 'accelerate',"
        " 'deepspeed', 'tokenizers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == []


def test_version_and_bare_command(capsys: pytest.CaptureFixture[str]) -> None:
    """`llmtrain --version` names the version; bare `llmtrain` is a usage error (exit 64), so
    a job script that lost its arguments fails instead of passing."""
    from llmtrain import cli
    from llmtrain.errors import EXIT_USAGE

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("llmtrain ")
    assert cli.main([]) == EXIT_USAGE
    assert "usage: llmtrain" in capsys.readouterr().err
