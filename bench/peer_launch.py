"""The pinned side of the peer: hands one workload to `python -m bench.peer` in another Python.

The peer needs transformers 5.x, which cannot share this process with the pinned 4.37.2. Per
workload this writes the rows (JSON lines), the exact sample order of the baseline's
EpochSeededSampler and the settings to a spec file, runs `PYTHON -m bench.peer SPEC OUT` from the
repository root with PYTHONPATH holding only this repository (and `peer_path`, e.g. a folder of
the peer's own wheels installed with `pip install --target`), so the pinned site-packages on
this process's PYTHONPATH are not seen, and reads back one RunResult or error per variant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from bench.peer import DEFAULT_FIXED, DEFAULT_PACKED, PackedLeak
from bench.probe import RunResult, fresh_memory
from bench.report import NotComparable, compare
from bench.runs import LORA, SEED
from bench.workloads import Workload
from llmtrain.data.sampling import EpochSeededSampler

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PeerOptions:
    python: str  # the peer's interpreter, with transformers 5.x, peft, accelerate, liger-kernel
    variants: list[str]  # bench.peer.VARIANTS names; empty: DEFAULT_FIXED / DEFAULT_PACKED
    liger: bool
    liger_note: str  # why Liger is on or off, printed with the table
    path: list[str]  # folders put first on the peer's PYTHONPATH


class PeerFailed(Exception):
    """`python -m bench.peer` exited non-zero or wrote no results."""


def peer_env(peer_path: list[str]) -> dict[str, str]:
    """This environment with PYTHONPATH replaced: the peer's own folders, then this repository
    (bench/ and src/ for llmtrain.labels); nothing of the pinned stack."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*peer_path, str(REPO), str(REPO / "src")])
    return env


def run_peer(
    work: Workload,
    model_dir: Path,
    rows: datasets.Dataset,
    root: Path,
    warmup: int,
    steps: int,
    options: PeerOptions,
    variants: list[str],
) -> dict[str, Any]:
    """Runs the peer's variants on `rows` in the baseline's order; returns its report, each run's
    "raw" turned back into a RunResult under "result". Raises PeerFailed."""
    fresh_memory()  # the peer's process gets the memory this one cached
    root.mkdir(parents=True, exist_ok=True)
    rows_file = root / "rows.jsonl"
    with rows_file.open("w") as f:
        for row in rows:
            f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
    spec = {
        "workload": {
            "name": work.name,
            "method": work.method,
            "batch": work.batch,
            "accumulation": work.accumulation,
            "variable": work.variable,
            "learning_rate": work.learning_rate,
        },
        "model_dir": str(model_dir),
        "rows": str(rows_file),
        # The baseline's first epoch: BaselineTrainer draws EpochSeededSampler(len, SEED).
        "order": list(EpochSeededSampler(len(rows), SEED)),
        "lora": LORA,
        "seed": SEED,
        "warmup": warmup,
        "steps": steps,
        "variants": variants,
        "liger": options.liger,
        "liger_note": options.liger_note,
        "work_dir": str(root / "runs"),
    }
    spec_file, out_file = root / "spec.json", root / "peer.json"
    spec_file.write_text(json.dumps(spec) + "\n")
    cmd = [options.python, "-m", "bench.peer", str(spec_file), str(out_file)]
    print(f"== {work.name}: peer: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=peer_env(options.path), check=False)
    if proc.returncode != 0 or not out_file.is_file():
        raise PeerFailed(f"{' '.join(cmd)} exited {proc.returncode} (its stderr is above)")
    report: dict[str, Any] = json.loads(out_file.read_text())
    for run in report["runs"]:
        run["result"] = RunResult(**run["raw"])
    return report


def peer_rows(
    work: Workload,
    model_dir: Path,
    rows: datasets.Dataset,
    root: Path,
    warmup: int,
    steps: int,
    options: PeerOptions,
    base: RunResult,
    shape: dict[str, int],
) -> tuple[list[dict[str, Any]], bool]:
    """One results row per peer variant, compared with the baseline; True when one is refused
    (its steps held other samples, or its packed samples attended to each other)."""
    variants = options.variants or list(DEFAULT_PACKED if work.variable else DEFAULT_FIXED)
    try:
        report = run_peer(work, model_dir, rows, root, warmup, steps, options, variants)
    except PeerFailed as exc:
        return [{"workload": work.name, "run": "peer", "error": str(exc)}], False
    stack = ", ".join(f"{k} {v}" for k, v in report["packages"].items())
    stack += f"; liger {'on' if options.liger else 'off'} ({options.liger_note})"
    out: list[dict[str, Any]] = []
    refused = False
    for run in report["runs"]:
        result: RunResult = run["result"]
        row: dict[str, Any] = {"workload": work.name, "run": run["run"], "peer_stack": stack}
        check = result.notes.get("packed_check")
        if "error" in run:
            leaked = run["error"].startswith(PackedLeak.__name__)
            row["error"] = f"refused: {run['error']}" if leaked else run["error"]
            refused |= leaked
        elif work.variable and not (check and check["ok"]):
            row["error"] = f"refused: packed samples not shown apart ({check})"
            refused = True
        else:
            try:
                row.update(compare(base, result, shape))
            except NotComparable as exc:
                row["error"] = f"refused: {exc}"
                refused = True
        row["raw"] = run["raw"]
        out.append(row)
    return out, refused
