"""DDP weak scaling of the 1.1B full fine-tune and the all-reduce bus bandwidth of the node.

For each GPU count n in 1, 2, 4, 8 (as many as are visible), one `llmtrain.train.run.train` run
under torchrun with the same micro-batch per GPU (so the work per GPU is constant), timed over
the steady steps; efficiency = tokens/s per GPU at n / tokens/s per GPU at 1. Then
`llmtrain doctor` over all GPUs measures an all-reduce's bus bandwidth as nccl-tests reports it.
Writes scaling.json and scaling.md to --out (default $OUT).

  python -m bench.scaling                 # on a GPU node
  python -m bench.scaling --model tiny    # CPU smoke of the script (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.strategies import SEQ, build_data, run_config, torchrun
from bench.workloads import build_model

MICRO_BATCH = {"1b": 8, "tiny": 4}
STEPS = 14


def train_run(gpus: int, size: str, model: Path, data: Path, root: Path) -> dict[str, Any]:
    run_dir = root / f"ddp-{gpus}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = run_config("full-ddp-2", size, model, data, run_dir / "out")
    cfg["training"].update(per_device_train_batch_size=MICRO_BATCH[size], max_steps=STEPS)
    config = run_dir / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = run_dir / "result.json"
    proc = subprocess.run(
        torchrun(gpus, "bench.strategies", "--worker", str(config), str(result), size),
        capture_output=True,
        text=True,
    )
    (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("result.json.rank*"))]
    if proc.returncode != 0 or not ranks:
        return {"gpus": gpus, "exit": proc.returncode, "error": (proc.stdout + proc.stderr)[-3000:]}
    step_s = max(r["step_s"] for r in ranks)
    return {
        "gpus": gpus,
        "exit": 0,
        "micro_batch": MICRO_BATCH[size],
        "seq": SEQ[size],
        "step_s": step_s,
        "tokens_per_s_per_gpu": MICRO_BATCH[size] * SEQ[size] / step_s,
        "peak_gib": max(r["peak_bytes"] for r in ranks) / 1024**3,
        "config": str(config),
    }


def bus_bandwidth(gpus: int, config: str) -> dict[str, Any]:
    proc = subprocess.run(
        torchrun(gpus, "llmtrain.cli", "doctor", config, "--json"), capture_output=True, text=True
    )
    text = proc.stdout
    start = text.find("{")
    if start < 0:
        return {"exit": proc.returncode, "error": (proc.stdout + proc.stderr)[-3000:]}
    summary: dict[str, Any] = json.JSONDecoder().raw_decode(text[start:])[0]
    return {"exit": proc.returncode, **summary}


def markdown(rows: list[dict[str, Any]], doctor: dict[str, Any]) -> str:
    base = next((r for r in rows if r["gpus"] == 1 and r["exit"] == 0), None)
    lines = [
        "| GPUs | micro-batch x seq | tokens/s per GPU | efficiency vs 1 GPU | peak GiB/GPU |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if r["exit"] != 0:
            lines.append(f"| {r['gpus']} | failed (exit {r['exit']}) | | | |")
            continue
        eff = r["tokens_per_s_per_gpu"] / base["tokens_per_s_per_gpu"] if base else float("nan")
        lines.append(
            f"| {r['gpus']} | {r['micro_batch']} x {r['seq']} | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | {eff:.1%} | {r['peak_gib']:.1f} |"
        )
    lines += ["", "doctor: " + json.dumps(doctor.get("allreduce", doctor))[:2000]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["1b", "tiny"], default="1b")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    parser.add_argument("--work", help="models and runs (default: a temporary directory)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    visible = torch.cuda.device_count() or 2  # CPU: two gloo processes
    root = Path(args.work or tempfile.mkdtemp(prefix="llmtrain-scaling-"))
    model, _ = build_model(args.model, root)
    data = build_data(root, rows=8 * MICRO_BATCH[args.model] * STEPS * SEQ[args.model] // 2000 + 16)
    rows = [train_run(n, args.model, model, data, root) for n in (1, 2, 4, 8) if n <= visible]
    done = [r for r in rows if r["exit"] == 0]
    doctor = bus_bandwidth(visible, done[-1]["config"]) if done else {}
    (out / "scaling.json").write_text(json.dumps({"runs": rows, "doctor": doctor}, indent=2))
    table = markdown(rows, doctor)
    (out / "scaling.md").write_text(table)
    print(table)
    return 0 if len(done) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
