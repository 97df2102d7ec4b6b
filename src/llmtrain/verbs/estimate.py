"""`llmtrain estimate CONFIG`: memory per GPU and compute for a run, from config.json alone."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from llmtrain.config import RunConfig, load_config
from llmtrain.errors import ConfigError
from llmtrain.plan import STRATEGIES as TABLE
from llmtrain.plan import RunPlan, refusal
from llmtrain.sizing.compute import DEFAULT_MFU, estimate_compute
from llmtrain.sizing.from_config import (
    micro_batch_words,
    model_shape,
    run_shape,
    target_plan,
    weight_bytes,
)
from llmtrain.sizing.gpus import DEFAULT_GPU, PRESETS, get_gpu
from llmtrain.sizing.memory import (
    FRAGMENTATION,
    METHODS,
    STRATEGIES,
    Method,
    RunShape,
    Strategy,
    estimate,
    gib,
    largest_micro_batch,
)

if TYPE_CHECKING:
    from llmtrain.sizing import tokens as measured_tokens

EXAMPLE = "llmtrain estimate configs/lora.yaml --gpus-per-node 4 --nodes 2 --gpu h100 --json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--gpu", default=DEFAULT_GPU, help=f"preset: {', '.join(PRESETS)}")
    parser.add_argument(
        "--attention",
        choices=["sdpa", "flash_attention_2", "eager"],
        help="default: the config's, auto = flash_attention_2 if it imports",
    )
    parser.add_argument("--tokens", type=float, help="training tokens (default: from max_steps)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOPs utilisation")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _tokens(
    cfg: RunConfig, run: RunShape, given: float | None, measured: measured_tokens.Measured | None
) -> float | None:
    """Training tokens: given, else max_steps x samples per step x the measured mean sample
    length (data.max_length without measured lengths)."""
    if given:
        return given
    t = cfg.training
    mean = float(measured.lengths.mean()) if measured and len(measured.lengths) else run.seq_len
    if t.max_steps > 0:
        return t.max_steps * run.micro_batch * t.gradient_accumulation_steps * run.world * mean
    return None


def report(cfg: RunConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The estimate as a dict (the --json output).

    Raises:
        ConfigError: the config cannot run on --gpu, or --attention flash_attention_2 asks
            for flash-attn 2 on a GPU older than compute capability 8.0 (exit 64)."""
    shape = model_shape(cfg)
    device = get_gpu(args.gpu)
    if args.attention == "flash_attention_2" and not device.bf16:
        # --attention is a what-if (flash_attn need not import here, on a login node), but no
        # flash_attn runs on this GPU at all.
        raise ConfigError(
            f"--attention flash_attention_2 cannot run on a {device.name}: flash-attn 2 needs "
            "compute capability 8.0 (an A100 or later)",
            "leave --attention out (the plan picks sdpa there) or give --attention sdpa",
        )
    plan = target_plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=device)
    from llmtrain.sizing import tokens as measured_tokens

    measured = measured_tokens.from_prepared(cfg)
    run = run_shape(
        cfg,
        shape,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        attention=args.attention,
        plan=plan,
        measured=measured,
        gpu=device,
    )

    # Each preset's column is judged with the run its own plan makes there (a V100 plans fp16
    # and SDPA, with k and v repeated), not with --gpu's; None where its plan refuses the run.
    on_preset: dict[str, tuple[RunShape, RunPlan] | None] = {}
    for name, g in PRESETS.items():
        if g is device:  # --gpu's own, made above
            on_preset[name] = (run, plan)
            continue
        try:
            p = target_plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=g)
        except ConfigError:
            on_preset[name] = None
            continue
        on_preset[name] = (
            run_shape(cfg, shape, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      attention=None if args.attention == "flash_attention_2" and not g.bf16
                      else args.attention, plan=p, measured=measured, gpu=g),
            p,
        )  # fmt: skip

    def variant(base: RunShape, base_plan: RunPlan, m: Method, s: Strategy, c: bool) -> RunShape:
        return replace(
            base,
            method=m,
            strategy=s,
            gradient_checkpointing=c,
            weight_bytes=weight_bytes(cfg, base_plan, "lora" if m == "inference" else m),
        )

    def fits(m: Method, s: Strategy, c: bool) -> dict[str, bool]:
        out = {}
        for name, g in PRESETS.items():
            there = on_preset[name]
            out[name] = there is not None and (
                estimate(shape, variant(*there, m, s, c)).total <= g.memory_bytes
            )
        return out

    def row(r: RunShape) -> dict[str, Any]:
        b = estimate(shape, r)
        return {
            "method": r.method,
            "strategy": r.strategy,
            "gradient_checkpointing": r.gradient_checkpointing,
            "breakdown_bytes": dict(b.rows()),
            "host_per_node_bytes": b.host_per_node,
            "notes": list(b.notes),
            "fits": fits(r.method, r.strategy, r.gradient_checkpointing),
            "largest_micro_batch": largest_micro_batch(shape, r, device.memory_bytes),
        }

    def allowed(m: str, s: str, c: bool) -> bool:
        """The pairs `check` lets through (plan.STRATEGIES), and inference once."""
        if m == "inference":
            return s == "ddp" and not c
        dora_sharded = m == "lora" and run.use_dora and TABLE[s].shards_parameters
        return refusal(m, s) is None and not dora_sharded

    methods = [m for m in METHODS if m != "layers" or run.method == "layers"]
    grid = [
        row(variant(run, plan, m, s, c))
        for m in methods
        for s in STRATEGIES
        for c in (False, True)
        if allowed(m, s, c)
    ]
    tokens = _tokens(cfg, run, args.tokens, measured)
    compute = None
    if tokens:
        c = estimate_compute(shape, run, tokens, device.peak_tflops, args.mfu)
        compute = {
            "tokens": tokens,
            "flops": c.flops,
            "hours": c.seconds / 3600,
            "gpu_hours": c.gpu_hours,
            "pf_days": c.pf_days,
            "mfu": c.mfu,
            "gpu": device.name,
            "gpus": c.gpus,
        }
    return {
        "model": {**asdict(shape), "params": shape.params},
        "run": {**asdict(run), "world": run.world, "tokens": run.tokens},
        "plan": plan.to_dict(),
        "tokens_from": measured.source if measured else "data.max_length",
        "micro_batch": micro_batch_words(run, measured),
        "tokens_per_batch": cfg.training.tokens_per_batch,
        "gpu": {"name": device.name, "memory_bytes": device.memory_bytes},
        "fragmentation_margin": FRAGMENTATION,
        "this_run": row(run),
        "grid": grid,
        "compute": compute,
    }


def parameters(n: int) -> str:
    """A parameter count as people write it: 6.74B, 135M, 0.33M (never 0.00B, nor 1e+03M for
    what rounds to a thousand millions)."""
    return f"{n / 1e9:.2f}B" if n >= 999.5e6 else f"{n / 1e6:.3g}M"


def _print_table(rep: dict[str, Any]) -> None:
    m, r, this = rep["model"], rep["run"], rep["this_run"]
    print(
        f"model: {parameters(m['params'])} parameters, {m['layers']} layers, hidden {m['hidden']},"
        f" vocab {m['vocab']}"
    )
    # The plan's strategy: the estimator sizes one process as a DDP world of one (RunShape).
    print(
        f"run: {r['method']}, {rep['plan']['strategy']['value']}, {r['nodes']} node(s) x"
        f" {r['gpus_per_node']} GPU(s), {rep['micro_batch']}, attention {r['attention']},"
        f" checkpointing {'on' if r['gradient_checkpointing'] else 'off'}"
    )
    print("plan (as finetune would decide on these GPUs):")
    for name, d in rep["plan"].items():
        value = ("on" if d["value"] else "off") if isinstance(d["value"], bool) else d["value"]
        print(f"  {name}: {value} ({d['reason']})")
    print(f"\nmemory per GPU (GiB; fragmentation margin {rep['fragmentation_margin']:.0%}):")
    for name, value in this["breakdown_bytes"].items():
        print(f"  {name:<16}{gib(value):>10}")
    for note in this["notes"]:
        print(f"  note: {note}")
    if this["host_per_node_bytes"]:
        print(f"  host memory per node: {gib(this['host_per_node_bytes'])} GiB")
    largest = this["largest_micro_batch"]
    # The search scales the micro-batch in samples, and its tokens with them; under a token
    # budget the tokens are what the user sets.
    what = (
        f"{-(-r['batch_tokens'] * largest // r['micro_batch'])} tokens per GPU "
        "(training.tokens_per_batch)"
        if rep["tokens_per_batch"]
        else f"{largest} samples per GPU (training.per_device_train_batch_size)"
    )
    print(
        f"\nlargest micro-batch on {rep['gpu']['name']}: "
        + (what if largest else "none fits, not even one sample or budget per GPU")
    )
    names = list(PRESETS)
    print("\nall methods and strategies (total GiB per GPU; + fits, - does not):")
    print(
        f"  {'method':<10}{'strategy':<15}{'ckpt':<6}{'total':>9}  "
        + " ".join(f"{PRESETS[n].name.split(' ')[0] + ' ' + n.split('-')[-1]:>13}" for n in names)
    )
    for row in rep["grid"]:
        marks = " ".join(f"{'+' if row['fits'][n] else '-':>13}" for n in names)
        print(
            f"  {row['method']:<10}{row['strategy']:<15}"
            f"{'on' if row['gradient_checkpointing'] else 'off':<6}"
            f"{gib(row['breakdown_bytes']['total']):>9}  {marks}"
        )
    c = rep["compute"]
    if c:
        print(
            f"\ncompute: {c['tokens']:.3g} tokens, {c['flops']:.3g} FLOPs = {c['pf_days']:.3g}"
            f" PF-days; at MFU {c['mfu']:.0%} on {c['gpus']} x {c['gpu']}: {c['hours']:.2f} h,"
            f" {c['gpu_hours']:.1f} GPU-hours"
        )
    else:
        print("\ncompute: pass --tokens (or set training.max_steps) for time and GPU-hours")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    rep = report(cfg, args)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        _print_table(rep)
    return 0
