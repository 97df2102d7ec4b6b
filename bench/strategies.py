"""Every supported method x strategy against a one-GPU run of the same global batch and seed.

Each run trains a random-init Llama (TinyLlama-1.1B shape by default; no download) through the
real path, `llmtrain.train.run.train` under torchrun, for STEPS optimizer steps on fixed-length
packed blocks, so every rank's micro-batch holds the same number of loss tokens and the mean of
the ranks' losses is the global mean. Recorded per run: the exact per-step losses (against the
reference of its method), peak allocated GiB per GPU (from the first step to the end of
training), tokens/s per GPU (steps 5..end), and the probe logits of the trained model. Then a
process that never trained reloads each final directory the way `llmtrain generate` does and
compares its logits with those. Writes strategies.json and strategies.md to --out (default $OUT).

  python -m bench.strategies                        # every combination the GPUs allow
  python -m bench.strategies --only full-fsdp-2 lora-zero3-2
  python -m bench.strategies --model tiny           # CPU smoke of the script (gloo; no ZeRO)
  python -m bench.strategies --only qlora-ddp-2 --set training.args.full_determinism=true
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

STEPS = 20
GLOBAL_BATCH = 8
SEQ = {"1b": 1024, "7b": 1024, "tiny": 64}
# QLoRA at 1e-3 diverges chaotically: two deterministic runs that differ by 1e-5 at step 4
# (one GPU against DDP) part twice as far each step, 33% by step 16 (bench/STRATEGIES.md).
LR = {"full": 5e-5, "layers": 5e-5, "lora": 1e-3, "qlora": 1e-4}
LAYERS = ["last:2", "lm_head"]
LOSS_RTOL = 0.02  # per step, relative to the one-GPU reference
LOGIT_ATOL = 0.15  # reloaded vs in-memory logits; ZeRO saves 16-bit weights
# name: (method, strategy, gpus). Each multi-GPU run is checked against the one-GPU run of the
# same method and strategy where there is one, else against "single": bf16 weights (FSDP mixed
# precision, DeepSpeed bf16) and fp32 weights under autocast (single, DDP) are different
# numerics before any GPU is added; the "single" comparison is reported beside it.
RUNS: dict[str, tuple[str, str, int]] = {
    "full-single-1": ("full", "single", 1),
    "lora-single-1": ("lora", "single", 1),
    "layers-single-1": ("layers", "single", 1),
    "qlora-single-1": ("qlora", "single", 1),
    "full-fsdp-1": ("full", "fsdp", 1),
    "full-zero2-1": ("full", "zero2", 1),
    "full-zero3-1": ("full", "zero3", 1),
    "full-ddp-2": ("full", "ddp", 2),
    "full-fsdp-2": ("full", "fsdp", 2),
    "full-zero2-2": ("full", "zero2", 2),
    "full-zero3-2": ("full", "zero3", 2),
    "full-zero3_offload-2": ("full", "zero3_offload", 2),
    "lora-ddp-2": ("lora", "ddp", 2),
    "lora-fsdp-2": ("lora", "fsdp", 2),
    "lora-zero2-2": ("lora", "zero2", 2),
    "lora-zero3-2": ("lora", "zero3", 2),
    "lora-zero3_offload-2": ("lora", "zero3_offload", 2),
    "layers-ddp-2": ("layers", "ddp", 2),
    "layers-zero2-2": ("layers", "zero2", 2),
    "qlora-ddp-2": ("qlora", "ddp", 2),
}


def single(name: str) -> str:
    return f"{RUNS[name][0]}-single-1"


def reference(name: str) -> str:
    """The one-GPU run a run is checked against (itself for a one-GPU run)."""
    method, strategy, gpus = RUNS[name]
    if gpus == 1:
        return name
    # Offloading moves the optimizer, not the numerics: ZeRO-3 on one GPU is its reference.
    same = f"{method}-{strategy.removesuffix('_offload')}-1"
    return same if same in RUNS else single(name)


def run_config(name: str, size: str, model: Path, data: Path, out: Path) -> dict[str, Any]:
    method, strategy, gpus = RUNS[name]
    cfg: dict[str, Any] = {
        "model": {"path": str(model)},
        "data": {
            "path": str(data),
            "shape": "text",
            "max_length": SEQ[size],
            "packing": "blocks",
            "prepared_dir": str(out.parent.parent / f"prepared-{size}"),
        },
        "method": {"name": method, **({"layers": LAYERS} if method == "layers" else {})},
        "training": {
            "per_device_train_batch_size": GLOBAL_BATCH // gpus,
            "learning_rate": LR[method],
            "lr_scheduler_type": "constant",
            "max_steps": STEPS,
            "save_steps": 10 * STEPS,
            "logging_steps": 1,
            "report_to": ["none"],
            "dataloader_num_workers": 0,
            "chunked_loss": False,
        },
        "output": {"dir": str(out)},
        "distributed": {"strategy": "auto" if strategy == "single" else strategy},
    }
    if method in ("lora", "qlora"):
        cfg["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0}  # dropout differs across ranks
    return cfg


def probe_ids(size: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 300, (2, 64), generator=g)


class Meter(TrainerCallback):
    """Peak allocated memory from the first step, and the time of each optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.start = 0.0
        self.peak = 0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.times and torch.cuda.is_available() and state.global_step == 0:
            torch.cuda.reset_peak_memory_stats()
        self._sync()
        self.start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self.start)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()


def worker(config_path: str, result_path: str, size: str) -> None:
    """One rank of one run, under torchrun."""
    from llmtrain.config import load_config
    from llmtrain.plan import World
    from llmtrain.train.run import train

    cfg = load_config(config_path)
    world = World.from_env()
    meter = Meter()
    trainer = train(cfg, world, [meter])
    model = trainer.model_wrapped
    model.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        logits = model(input_ids=probe_ids(size).to(device)).logits.float().cpu()
    steady = meter.times[4:] or meter.times
    result = {"rank": world.rank, "peak_bytes": meter.peak, "step_s": sum(steady) / len(steady)}
    Path(f"{result_path}.rank{world.rank}").write_text(json.dumps(result))
    if world.is_main:
        torch.save(logits, f"{result_path}.logits.pt")


def torchrun(gpus: int, module: str, *args: str) -> list[str]:
    """One process per GPU of this machine running `python -m module args`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        "-m",
        module,
        *args,
    ]


def launch(
    name: str, size: str, model: Path, data: Path, root: Path, overrides: list[str]
) -> dict[str, Any]:
    import yaml

    from llmtrain.config import apply_overrides

    method, strategy, gpus = RUNS[name]
    run_dir = root / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = run_dir / "run.yaml"
    cfg = apply_overrides(run_config(name, size, model, data, run_dir / "out"), overrides)
    config.write_text(yaml.safe_dump(cfg))
    result = run_dir / "result.json"
    cmd = torchrun(gpus, "bench.strategies", "--worker", str(config), str(result), size)
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (run_dir / "log.txt").write_text(proc.stdout + proc.stderr)
    row: dict[str, Any] = {
        "run": name,
        "method": method,
        "strategy": strategy,
        "gpus": gpus,
        **({"overrides": overrides} if overrides else {}),
        "exit": proc.returncode,
        "wall_s": round(time.time() - started, 1),
    }
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("result.json.rank*"))]
    if proc.returncode != 0 or not ranks:
        row["error"] = (proc.stdout + proc.stderr)[-3000:]
        return row
    metrics = [json.loads(x) for x in (run_dir / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [v for r in metrics for v in r.get("loss_exact", [])]
    step_s = max(r["step_s"] for r in ranks)
    row.update(
        losses=losses,
        peak_gib=max(r["peak_bytes"] for r in ranks) / 1024**3,
        tokens_per_s_per_gpu=GLOBAL_BATCH * SEQ[size] / step_s / gpus,
        final=str(
            run_dir / "out" / "final" / ("adapter" if method in ("lora", "qlora") else "model")
        ),
        logits=str(result) + ".logits.pt",
    )
    return row


def reload_check(rows: list[dict[str, Any]], model: Path) -> None:
    """In this process (which never joined torch.distributed), load each final directory as
    `llmtrain generate` does and compare its probe logits with the trained model's."""
    from llmtrain.config import ModelSection
    from llmtrain.model.export import load_for_inference

    base = ModelSection(path=str(model))
    for row in rows:
        if "final" not in row:
            continue
        final = Path(row["final"])
        if row["method"] in ("lora", "qlora"):
            loaded, _ = load_for_inference(base, final, quantized=row["method"] == "qlora")
        else:
            loaded, _ = load_for_inference(base.model_copy(update={"path": str(final)}), None)
        device = next(loaded.parameters()).device
        size = "tiny" if device.type == "cpu" else "1b"
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
        ):
            logits = loaded(input_ids=probe_ids(size).to(device)).logits.float().cpu()
        trained = torch.load(row["logits"])
        row["reload_max_abs_diff"] = float((logits - trained).abs().max())
        row["reload_ok"] = row["reload_max_abs_diff"] <= LOGIT_ATOL
        del loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def max_rel_diff(losses: list[float], ref: list[float]) -> float:
    pairs = list(zip(losses, ref, strict=False))[:STEPS]
    if len(pairs) < STEPS:
        return math.nan
    diffs = [abs(a - b) / abs(b) for a, b in pairs]
    # max() skips NaN depending on its position: a NaN loss is a mismatch outright.
    return max(diffs) if all(map(math.isfinite, diffs)) else math.nan


def compare_losses(rows: list[dict[str, Any]]) -> None:
    by_name = {r["run"]: r for r in rows if "losses" in r}
    for row in rows:
        for stale in ("loss_match", "loss_max_rel_diff", "vs_single_max_rel_diff"):
            row.pop(stale, None)  # rows merged from earlier result files
        if "losses" not in row:
            continue
        ref, plain = by_name.get(reference(row["run"])), by_name.get(single(row["run"]))
        if ref is not None and ref is not row:
            row["loss_max_rel_diff"] = max_rel_diff(row["losses"], ref["losses"])
            row["loss_match"] = row["loss_max_rel_diff"] <= LOSS_RTOL
        if plain is not None and plain is not row:
            row["vs_single_max_rel_diff"] = max_rel_diff(row["losses"], plain["losses"])


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"| run | method | strategy | GPUs | loss match (first {STEPS}, rtol {LOSS_RTOL}) "
        "| vs single | loss at 1 / last | peak GiB/GPU | tokens/s/GPU | reload max abs diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            errors = [x for x in r["error"].splitlines() if "Error" in x] or ["see JSON"]
            reason = errors[-1].strip()[:120].replace("|", "/")
            lines.append(
                f"| {r['run']} | {r['method']} | {r['strategy']} | {r['gpus']} | "
                f"failed (exit {r['exit']}): {reason} | | | | | |"
            )
            continue
        match = (
            f"{'yes' if r['loss_match'] else 'NO'} ({r['loss_max_rel_diff']:.4f}, "
            f"against {reference(r['run'])})"
            if "loss_match" in r
            else "reference"
            if r["gpus"] == 1
            else "no reference"
        )
        plain = f"{r['vs_single_max_rel_diff']:.4f}" if "vs_single_max_rel_diff" in r else "-"
        reload = (
            f"{r['reload_max_abs_diff']:.4f} {'ok' if r['reload_ok'] else 'NO'}"
            if "reload_max_abs_diff" in r
            else "-"
        )
        lines.append(
            f"| {r['run']} | {r['method']} | {r['strategy']} | {r['gpus']} | {match} | {plain} | "
            f"{r['losses'][0]:.4f} / {r['losses'][-1]:.4f} | {r['peak_gib']:.2f} | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | {reload} |"
        )
    return "\n".join(lines) + "\n"


def build_data(root: Path, rows: int) -> Path:
    from llmtrain.config import resolve_path

    words = Path(resolve_path("embedded:corpus.txt")).read_text().split()
    path = root / "text.jsonl"
    with path.open("w") as f:
        for i in range(rows):
            f.write(
                json.dumps(
                    {"text": " ".join(words[(i * 97 + k) % len(words)] for k in range(3000))}
                )
                + "\n"
            )
    return path


def runnable(name: str, gpus: int) -> str | None:
    """Why a run cannot happen here, or None."""
    import importlib.util

    method, strategy, need = RUNS[name]
    if need > (gpus or 2):  # without GPUs: gloo processes on the CPU
        return f"needs {need} GPUs"
    if gpus == 0 and (strategy.startswith("zero") or method == "qlora"):
        return "GPU only"
    if gpus == 0 and strategy == "fsdp" and need == 1:
        return "one-process FSDP runs on a GPU only (accelerate 0.26)"
    if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="runs to do")
    parser.add_argument(
        "--no-refs",
        action="store_true",
        help="do not add the one-GPU references of --only (merge with --report)",
    )
    parser.add_argument(
        "--report",
        nargs="*",
        type=Path,
        help="no runs: merge these strategies.json files (later ones win) "
        "and write the comparison and the table",
    )
    parser.add_argument("--model", choices=["1b", "tiny"], default="1b")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config override for every run, as on the llmtrain command line",
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-results"))
    parser.add_argument("--work", help="models and runs (default: a temporary directory)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        merged: dict[str, dict[str, Any]] = {}
        for path in args.report:
            merged.update({r["run"]: r for r in json.loads(path.read_text())})
        return finish(sorted(merged.values(), key=lambda r: list(RUNS).index(r["run"])), out)
    from bench.workloads import build_model

    gpus = torch.cuda.device_count()
    root = Path(args.work or tempfile.mkdtemp(prefix="llmtrain-strategies-"))
    model, _ = build_model(args.model, root)
    data = build_data(root, rows=GLOBAL_BATCH * STEPS * SEQ[args.model] // 2000 + 16)
    names = args.only or list(RUNS)
    if not args.no_refs:
        refs = {reference(n) for n in names} | {single(n) for n in names}
        names = sorted(set(names) | refs, key=list(RUNS).index)
    rows: list[dict[str, Any]] = []
    for name in names:
        why = runnable(name, gpus)
        if why is not None:
            print(f"strategies: {name}: skipped, {why}", file=sys.stderr)
            continue
        print(f"strategies: {name}", file=sys.stderr, flush=True)
        rows.append(launch(name, args.model, model, data, root, args.set))
        reload_check(rows[-1:], model)
        finish(rows, out)
    return finish(rows, out)


def finish(rows: list[dict[str, Any]], out: Path) -> int:
    compare_losses(rows)
    (out / "strategies.json").write_text(json.dumps(rows, indent=2))
    (out / "strategies.md").write_text(markdown(rows))
    print(markdown(rows))
    ok = all(r.get("loss_match", r["gpus"] == 1) and r.get("reload_ok") for r in rows)
    return 0 if ok and rows else 1


if __name__ == "__main__":
    sys.exit(main())
