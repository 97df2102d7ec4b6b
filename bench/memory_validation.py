#!/usr/bin/env python
"""Predicted peak memory (llmtrain estimate) against torch.cuda.max_memory_allocated, on GPUs.

Each run builds a random-init Llama from a published config (no download), trains a few steps
through the real path (`llmtrain.train.run.train`: load_model -> wrap -> Trainer with the
strategy), and records the allocator peak over the training steps (reset when the first step
starts, so model loading does not count). Runs the estimator predicts will not fit must
really run out of memory. Writes memory_validation.{json,md} to $OUT (or --out).

  python -m bench.memory_validation            # every run the visible GPUs allow
  python -m bench.memory_validation --only lora-7b-ddp
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.strategies import build_data, torchrun
from bench.workloads import MODELS, build_model

if TYPE_CHECKING:
    from llmtrain.sizing.gpus import Gpu

# name: (model, method, strategy, gpus, micro_batch, seq_len, checkpointing)
RUNS: dict[str, tuple[str, str, str, int, int, int, bool]] = {
    "full-1b-ddp": ("1b", "full", "ddp", 1, 8, 1024, False),
    "full-1b-fsdp": ("1b", "full", "fsdp", 2, 8, 1024, False),
    "lora-7b-ddp": ("7b", "lora", "ddp", 1, 4, 1024, False),
    "lora-7b-ckpt": ("7b", "lora", "ddp", 1, 8, 2048, True),
    "qlora-7b-ddp": ("7b", "qlora", "ddp", 1, 4, 1024, False),
    "lora-7b-zero2": ("7b", "lora", "zero2", 2, 4, 1024, False),
    "full-7b-zero3": ("7b", "full", "zero3", 2, 2, 1024, True),
    # predicted not to fit a 141 GB H200: must run out of memory
    "full-7b-ddp-oom": ("7b", "full", "ddp", 1, 4, 2048, False),
    "lora-7b-b32-oom": ("7b", "lora", "ddp", 1, 32, 2048, False),
}
STEPS = 5


def run_config(name: str, model: Path, data: Path, out: Path) -> dict[str, Any]:
    _, method, strategy, _, batch, seq, ckpt = RUNS[name]
    return {
        "model": {"path": str(model), "dtype": "auto", "attn_implementation": "auto"},
        "data": {"path": str(data), "shape": "text", "max_length": seq, "packing": "blocks"},
        "method": {"name": method},
        "lora": {"r": 16, "dropout": 0.05},
        "training": {
            "per_device_train_batch_size": batch,
            "gradient_checkpointing": ckpt,
            "max_steps": STEPS,
            "save_steps": 10_000,
            "logging_steps": 1,
            "report_to": ["none"],
            "dataloader_num_workers": 0,
        },
        "output": {"dir": str(out)},
        "distributed": {"strategy": strategy},
    }


def predict(cfg: Any, gpus: int, attention: str, gpu: Gpu | None = None) -> Any:
    """`llmtrain estimate`'s breakdown for a run config on `gpus` GPUs of one node, planned
    for `gpu` (sizing.gpus.Gpu; None: a GPU of Ampere or later, as the H200s of the stored
    results)."""
    from llmtrain.sizing.from_config import model_shape, run_shape
    from llmtrain.sizing.memory import estimate

    shape = model_shape(cfg)
    return estimate(
        shape, run_shape(cfg, shape, gpus_per_node=gpus, attention=attention, gpu=gpu)
    )


def repredict(rows: list[dict[str, Any]], root: Path) -> None:
    """Measured rows from earlier result files against the current estimator (CPU only: the
    models' config.json is all it reads)."""
    from transformers import LlamaConfig

    from llmtrain.config import load_config
    from llmtrain.sizing.gpus import get_gpu

    h200 = get_gpu("h200").memory_bytes  # the GPU these runs measured on
    for size in {RUNS[row["run"]][0] for row in rows}:
        LlamaConfig(**MODELS[size]).save_pretrained(root / f"llama-{size}")
    data = root / "text.jsonl"
    data.write_text(json.dumps({"text": "unused"}) + "\n")
    for row in rows:
        name = row["run"]
        path = root / f"{name}.yaml"
        path.write_text(json.dumps(run_config(name, root / f"llama-{RUNS[name][0]}", data, root)))
        predicted = predict(load_config(path), RUNS[name][3], row.get("attention", "sdpa"))
        row["predicted_allocated_gib"] = predicted.allocated / 1024**3
        row["predicted_total_gib"] = predicted.total / 1024**3
        row["predicted_fits"] = predicted.total <= h200
        row["breakdown_gib"] = {k: v / 1024**3 for k, v in predicted.rows()}
        if row.get("measured_gib") and not row.get("oom"):
            row["error_pct"] = 100 * (row["predicted_allocated_gib"] / row["measured_gib"] - 1)


def worker(config_path: str, result_path: str) -> None:
    """One rank of one run, under torchrun: train, recording the allocator peak per step."""
    import torch
    from transformers import Trainer

    from llmtrain.config import load_config
    from llmtrain.model.load import load_model_config, pick_attention
    from llmtrain.plan import World
    from llmtrain.sizing.gpus import this_gpu
    from llmtrain.train.run import train

    cfg = load_config(config_path)
    world = World.from_env()
    peaks: list[int] = []
    original = Trainer.training_step

    def training_step(self: Trainer, *a: Any, **k: Any) -> Any:
        if not peaks:
            torch.cuda.reset_peak_memory_stats()
            peaks.append(0)
        loss = original(self, *a, **k)
        peaks.append(torch.cuda.max_memory_allocated())  # covers the previous optimizer step
        return loss

    Trainer.training_step = training_step
    attention = pick_attention(cfg.model, load_model_config(cfg.model))
    # The plan of the GPU measured on (a V100's is fp16 with SDPA), as finetune makes it there.
    predicted = predict(cfg, world.world_size, attention, this_gpu())
    oom = False
    try:
        train(cfg, world)
    except torch.cuda.OutOfMemoryError:
        oom = True
    result = {
        "rank": world.rank,
        "oom": oom,
        "measured_bytes": max(peaks) if peaks else None,
        "predicted_allocated_bytes": predicted.allocated,
        "predicted_total_bytes": predicted.total,
        "gpu_bytes": torch.cuda.mem_get_info()[1],
        "attention": attention,
        "breakdown": dict(predicted.rows()),
    }
    Path(f"{result_path}.rank{world.rank}").write_text(json.dumps(result))
    if oom:
        sys.exit(3)


def launch(name: str, root: Path) -> dict[str, Any]:
    import yaml

    size, method, strategy, gpus, batch, seq, ckpt = RUNS[name]
    model, _ = build_model(size, root)
    data = build_data(root, rows=batch * gpus * (STEPS + 2) * seq // 2000 + 8)
    run_dir = root / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = run_dir / "run.yaml"
    config.write_text(yaml.safe_dump(run_config(name, model, data, run_dir / "out")))
    result = run_dir / "result.json"
    cmd = torchrun(gpus, "bench.memory_validation", "--worker", str(config), str(result))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("result.json.rank*"))]
    row: dict[str, Any] = {
        "run": name,
        "model": size,
        "method": method,
        "strategy": strategy,
        "gpus": gpus,
        "micro_batch": batch,
        "seq_len": seq,
        "checkpointing": ckpt,
        "exit": proc.returncode,
    }
    if not ranks:
        row["error"] = (proc.stdout + proc.stderr)[-2000:]
        return row
    measured = [r["measured_bytes"] for r in ranks if r["measured_bytes"]]
    first = ranks[0]
    row.update(
        oom=any(r["oom"] for r in ranks),
        attention=first["attention"],
        predicted_allocated_gib=first["predicted_allocated_bytes"] / 1024**3,
        predicted_total_gib=first["predicted_total_bytes"] / 1024**3,
        predicted_fits=first["predicted_total_bytes"] <= first["gpu_bytes"],
        measured_gib=max(measured) / 1024**3 if measured else None,
        breakdown_gib={k: v / 1024**3 for k, v in first["breakdown"].items()},
    )
    if measured and not row["oom"]:
        row["error_pct"] = 100 * (row["predicted_allocated_gib"] / row["measured_gib"] - 1)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| run | method | strategy | GPUs | batch x seq | ckpt | attention | predicted GiB "
        "| measured GiB | error | predicted fits | OOM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: see JSON | | | | | | | | | | |")
            continue
        meas = f"{r['measured_gib']:.2f}" if r.get("measured_gib") else "-"
        err = f"{r['error_pct']:+.1f}%" if "error_pct" in r else "-"
        lines.append(
            f"| {r['run']} | {r['method']} | {r['strategy']} | {r['gpus']} | "
            f"{r['micro_batch']} x {r['seq_len']} | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['attention']} | {r['predicted_allocated_gib']:.2f} | {meas} | {err} | "
            f"{'yes' if r['predicted_fits'] else 'no'} | {'yes' if r['oom'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="runs to do")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    parser.add_argument("--work", help="models and runs (default: a temp dir; not under --out)")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--report",
        nargs="*",
        type=Path,
        help="no runs: merge these memory_validation.json files (later ones win) and predict "
        "their rows again with the current estimator",
    )
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    out = Path(args.out)
    if args.report:
        merged: dict[str, dict[str, Any]] = {}
        for path in args.report:
            merged.update({r["run"]: r for r in json.loads(path.read_text()) if "error" not in r})
        rows = sorted(merged.values(), key=lambda r: list(RUNS).index(r["run"]))
        repredict(rows, Path(args.work or tempfile.mkdtemp(prefix="llmtrain-memval-")))
        return finish(rows, out)
    import torch

    if not torch.cuda.is_available():
        print(
            "memory_validation: needs CUDA GPUs (it measures torch.cuda.max_memory_allocated)",
            file=sys.stderr,
        )
        return 64
    gpus = torch.cuda.device_count()
    names = [n for n in (args.only or RUNS) if RUNS[n][3] <= gpus]
    root = Path(args.work or tempfile.mkdtemp(prefix="llmtrain-memval-"))
    rows = []
    for name in names:
        print(f"memory_validation: {name}", file=sys.stderr, flush=True)
        rows.append(launch(name, root))
        write(rows, out)
    return finish(rows, out)


def write(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_validation.json").write_text(json.dumps(rows, indent=2))
    (out / "memory_validation.md").write_text(markdown(rows))


def finish(rows: list[dict[str, Any]], out: Path) -> int:
    write(rows, out)
    print(markdown(rows))
    measured = [r for r in rows if "error_pct" in r]
    within = all(abs(r["error_pct"]) <= 10 for r in measured)
    ooms_ok = all(r["oom"] for r in rows if "predicted_fits" in r and not r["predicted_fits"])
    print(f"within 10%: {within} ({len(measured)} runs); predicted OOMs really OOM: {ooms_ok}")
    return 0 if within and ooms_ok and len(measured) >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
