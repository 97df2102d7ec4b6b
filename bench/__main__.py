"""python -m bench: llmtrain against the plain HF Trainer baseline, in one process, on one GPU.

For each workload it builds the random-init model and the rows once, runs the baseline, then
each llmtrain variant on the same model, rows, sample order, sequence length and batch, and
writes results.json and results.md (and prints the table). With --peer-python it also runs the
strongest peer (bench/peer.py: transformers 5.x, Liger, padding-free packing) in that Python,
on the same rows and order, and gives every row its ratio to the best peer run. A run whose
steps did not hold the same samples as the baseline's, or a peer whose packed samples attended
to each other, is refused, and the command then exits 1.

  python -m bench                                   # every workload, on a GPU
  python -m bench --workloads fixed-1b-full --ablation
  python -m bench --smoke                           # tiny model, CPU, a minute
  python -m bench --workloads var-1b-full --accumulation 8 --tokens-per-batch 16384
                      # 64 samples per step on both sides; llmtrain also re-cut by a budget
  python -m bench --peer-python PEER/bin/python     # and the peer (or env BENCH_PEER_PYTHON)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.peer import VARIANTS as PEER_VARIANTS
from bench.peer_launch import PeerOptions, peer_rows
from bench.probe import Probe
from bench.report import MFU_FORMULA, NotComparable, add_peer_ratios, compare, metrics, table
from bench.runs import run_baseline, run_llmtrain
from bench.workloads import LENGTH_DISTRIBUTION, SMOKE, WORKLOADS, build_model, build_rows
from llmtrain import manifest

# llmtrain as a user gets it (fused AdamW on CUDA, chunked loss, 2 DataLoader workers, and for
# instruction data padding-free packing), then with torch.compile of the block pieces.
VARIANTS = {"llmtrain": [], "llmtrain+compile": ["training.compile=true"]}
BUDGET = "training.tokens_per_batch"  # --tokens-per-batch: the variant "llmtrain+budget"
# The same path with only fused AdamW differing from the baseline: what the other levers add.
ABLATION = {
    "llmtrain fused-AdamW only": [
        "training.chunked_loss=false",
        "training.dataloader_num_workers=0",
    ],
    "llmtrain+compile peft-LoRA": ["training.compile=true", "training.fused_lora=false"],
}
# Levers that only a full fine-tune has (dropped on LoRA workloads): bf16 parameters with fp32
# master weights in the optimizer, against the fp32 parameters under autocast of the runs above.
BF16_PARAMS = "training.param_dtype=bfloat16"
FULL_ONLY = {
    "llmtrain bf16-params": [BF16_PARAMS],
    "llmtrain+compile bf16-params": ["training.compile=true", BF16_PARAMS],
}


def targets(work_name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    ours = [r for r in rows if r["run"].startswith("llmtrain") and "error" not in r]
    if not ours:
        return {}
    if work_name.startswith("var-"):
        best = max(ours, key=lambda r: r["effective_ratio"])
        return {
            "best": best["run"],
            "effective_ratio>=2.0": best["effective_ratio"] >= 2.0,
            "first_loss_rel_diff<1e-2": best["first_loss_rel_diff"] < 1e-2,
            **peer_targets(ours, "peer_effective_ratio", 1.5),
        }
    best = max(ours, key=lambda r: r["tokens_ratio"])
    out = {
        "best": best["run"],
        "tokens_ratio>=1.25": best["tokens_ratio"] >= 1.25,
        "peak_memory<=baseline": best["memory_ratio"] is not None and best["memory_ratio"] <= 1.0,
    }
    if work_name == "fixed-1b-full":
        out["mfu>=0.45"] = best["mfu"] >= 0.45
    out.update(peer_targets(ours, "peer_tokens_ratio", 1.25 if "lora" in work_name else 1.2))
    if "lora" in work_name and "peer_memory_ratio" in best:
        out["peak_memory<=peer"] = (best["peer_memory_ratio"] or 2.0) <= 1.0
    return out


def peer_targets(ours: list[dict[str, Any]], ratio: str, target: float) -> dict[str, Any]:
    """Issue 21's targets against the best peer run, where the peer ran."""
    if not any(ratio in r for r in ours):
        return {}
    best = max(ours, key=lambda r: r[ratio])
    return {"best_vs_peer": best["run"], f"{ratio}>={target}": best[ratio] >= target}


def run_workload(
    name: str,
    smoke: bool,
    variants: dict[str, list[str]],
    root: Path,
    warmup: int,
    steps: int,
    profile_dir: Path | None = None,
    accumulation: int = 1,
    peer: PeerOptions | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    work = replace((SMOKE if smoke else WORKLOADS)[name], accumulation=accumulation)
    if not work.variable:  # a token budget packs instruction samples (padding-free) only
        variants = {k: v for k, v in variants.items() if not any(BUDGET in o for o in v)}
    if work.method != "full":
        variants = {k: v for k, v in variants.items() if BF16_PARAMS not in v}
    rows = build_rows(work, work.step_samples * (warmup + steps), seed=0)
    model_dir, shape = build_model(work.model, root)
    print(f"== {name}: {work.describe}, {len(rows)} rows", file=sys.stderr, flush=True)
    out: list[dict[str, Any]] = []
    refused = False

    def profile(label: str) -> Path | None:
        if profile_dir is None:
            return None
        profile_dir.mkdir(parents=True, exist_ok=True)
        return profile_dir / f"profile-{name}-{label.replace(' ', '_').replace('+', '_')}.txt"

    base = Probe("baseline", warmup, steps, profile("baseline"))
    try:
        run_baseline(work, model_dir, rows, root / f"{name}-baseline", base)
    except Exception as exc:  # an OOM here is a result: the baseline cannot run this
        traceback.print_exc()
        return [{"workload": name, "run": "baseline", "error": repr(exc)}], False
    out.append(
        {
            "workload": name,
            "run": "baseline",
            **metrics(base.result, shape),
            "raw": base.result.as_dict(),
        }
    )
    if peer is not None:
        got, refused = peer_rows(
            work, model_dir, rows, root / f"{name}-peer", warmup, steps, peer, base.result, shape
        )
        out += got
    compiled = [o for o in variants.values() if "training.compile=true" in o]
    if work.variable and compiled:
        # Each new row length class (dynamic shapes, Triton's divisible-by-16 variants) compiles
        # once per process, and a few warm-up steps do not meet them all: untimed, the first
        # compiled variant would pay them in its timed steps and the next ones not.
        print(f"== {name}: untimed compile warm-up", file=sys.stderr, flush=True)
        warm_dir = root / f"{name}-compile-warmup"
        run_llmtrain(work, model_dir, rows, warm_dir, Probe("warm-up", warmup, steps), compiled[0])
        shutil.rmtree(warm_dir, ignore_errors=True)
    for label, overrides in variants.items():
        probe = Probe(label, warmup, steps, profile(label))
        run_dir = root / f"{name}-{label.replace(' ', '_').replace('+', '_')}"
        row: dict[str, Any] = {"workload": name, "run": label}
        try:
            run_llmtrain(work, model_dir, rows, run_dir, probe, overrides)
            row.update(compare(base.result, probe.result, shape))
            row["predicted_peak_gib"] = probe.result.notes["predicted_allocated_bytes"] / 2**30
        except NotComparable as exc:
            row["error"] = f"refused: {exc}"
            refused = True
        except Exception as exc:
            traceback.print_exc()
            row["error"] = repr(exc)
        row["raw"] = probe.result.as_dict()
        out.append(row)
        shutil.rmtree(run_dir, ignore_errors=True)
    add_peer_ratios(out)
    return out, refused


def write_report(
    out: Path, rows: list[dict[str, Any]], summary: dict[str, Any], warmup: int, steps: int
) -> None:
    errors = "\n".join(
        f"- {r['workload']} / {r['run']}: {r['error']}" for r in rows if "error" in r
    )
    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "packages": manifest.package_versions(),
        "warmup_steps": warmup,
        "timed_steps": steps,
        "mfu_formula": MFU_FORMULA,
        "length_distribution": LENGTH_DISTRIBUTION,
        "targets": summary,
        "runs": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    md = table([r for r in rows if "error" not in r])
    stacks = sorted({r["peer_stack"] for r in rows if "peer_stack" in r})
    md += "".join(f"\n\npeer: {s}" for s in stacks)
    (out / "results.md").write_text(md + ("\n\n" + errors if errors else "") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=None, help="comma-separated; default: all")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="llmtrain variants (or ablation runs)"
    )
    parser.add_argument("--ablation", action="store_true", help="also every ablation run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, 1+2 steps")
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    parser.add_argument(
        "--profile", action="store_true", help="write each run's top kernels (skews timing)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="models and run outputs")
    parser.add_argument(
        "--accumulation", type=int, default=1,
        help="micro-batches per optimizer step on both sides (samples per step: batch x this)",
    )
    parser.add_argument(
        "--tokens-per-batch", type=int, default=None,
        help="also run llmtrain+budget on var-* workloads: each step's samples re-cut into "
        "packed micro-batches of at most this many tokens (training.tokens_per_batch)",
    )
    parser.add_argument(
        "--peer-python",
        default=os.environ.get("BENCH_PEER_PYTHON"),
        help="a Python with transformers 5.x, peft, accelerate and liger-kernel: also run the "
        "peer (bench/peer.py) in it (default: env BENCH_PEER_PYTHON; unset: no peer)",
    )
    parser.add_argument(
        "--peer-variants",
        default="",
        help=f"comma-separated, of {', '.join(PEER_VARIANTS)} (flex only runs on packed rows); "
        "default: peer,peer+compile on fixed rows, peer,peer flex,peer flex+compile on packed",
    )
    parser.add_argument(
        "--peer-path",
        default=os.environ.get("BENCH_PEER_PATH", ""),
        help=f"folders ({os.pathsep}-separated) first on the peer's PYTHONPATH, e.g. its wheels "
        "installed with pip install --target (default: env BENCH_PEER_PATH)",
    )
    parser.add_argument(
        "--no-peer-liger", action="store_true", help="run the peer without Liger's kernels"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    # One process compiles the block pieces for every model and shape of the run.
    torch._dynamo.config.cache_size_limit = 64
    known = SMOKE if args.smoke else WORKLOADS
    names = args.workloads.split(",") if args.workloads else list(known)
    every = {**ABLATION, **FULL_ONLY, **VARIANTS}
    asked = [v for v in args.variants.split(",") if v]
    peer_asked = [v for v in args.peer_variants.split(",") if v]
    unknown = [n for n in names if n not in known] + [v for v in asked if v not in every]
    unknown += [v for v in peer_asked if v not in PEER_VARIANTS]
    if unknown:
        parser.error(
            f"unknown workloads/variants: {', '.join(unknown)} (known: {', '.join(known)}; "
            f"variants {', '.join(every)}; peer variants {', '.join(PEER_VARIANTS)})"
        )
    peer = None
    if args.peer_python:
        gpu = torch.cuda.is_available()
        liger = gpu and not args.no_peer_liger
        note = (
            "--no-peer-liger" if args.no_peer_liger
            else "rope, rms_norm, swiglu, fused_linear_cross_entropy" if gpu
            else "no CUDA device: Liger's kernels are Triton GPU kernels"
        )  # fmt: skip
        # Absolute, since the peer starts in the repository root; links kept (a venv's python
        # is one, and only through it does the interpreter find its venv).
        python = args.peer_python
        python = os.path.abspath(python) if os.sep in python else python
        paths = [os.path.abspath(p) for p in args.peer_path.split(os.pathsep) if p]
        peer = PeerOptions(python, peer_asked, liger, note, paths)
    chosen = {v: every[v] for v in [*(ABLATION if args.ablation else []), *asked]}
    if args.tokens_per_batch is not None:
        budget = f"{BUDGET}={args.tokens_per_batch}"
        for label, overrides in list(chosen.items()):  # each bf16-params run, also re-cut
            if BF16_PARAMS in overrides:
                chosen[label.replace("llmtrain", "llmtrain+budget", 1)] = [*overrides, budget]
        chosen["llmtrain+budget"] = [budget]
    warmup, steps = (1, 2) if args.smoke else (args.warmup, args.steps)
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="llmtrain-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    refused = False
    summary: dict[str, Any] = {}
    try:
        for name in names:
            got, was_refused = run_workload(
                name, args.smoke, chosen, root, warmup, steps,
                args.out if args.profile else None, args.accumulation, peer,
            )  # fmt: skip
            rows += got
            refused |= was_refused
            summary[name] = targets(name, got)
            write_report(args.out, rows, summary, warmup, steps)  # each workload, as it ends
    finally:
        if args.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print((args.out / "results.md").read_text())
    print(json.dumps(summary, indent=1))
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
