"""`llmtrain validate`: check a run before any GPU is allocated (CPU, no weights loaded)."""

from __future__ import annotations

import argparse
import sys

from llmtrain.config import RunConfig, load_config
from llmtrain.plan import Hardware, RunPlan, World
from llmtrain.sizing.gpus import DEFAULT_GPU, PRESETS, get_gpu, this_gpu

EXAMPLE = "llmtrain validate configs/lora.yaml data.path=data/train.jsonl --gpu h100"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides: key.sub=value")
    parser.add_argument(
        "--assume-gpu",
        action="store_true",
        help="check for a GPU node even if neither --gpu nor the config asks for one",
    )
    parser.add_argument(
        "--gpu",
        help="check for a GPU node with this preset, also used by the memory check "
        f"(default {DEFAULT_GPU}): {', '.join(PRESETS)}",
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)


def _target(cfg: RunConfig, args: argparse.Namespace) -> tuple[Hardware, str, bool]:
    """The machine the checks are for, the line that says which, and whether it is this one
    (then the run trains in this Python environment): a GPU node when --gpu or --assume-gpu is
    given or the config needs one (the --gpu preset's, else this machine's GPU, else an A100 or
    later), else this one."""
    from llmtrain.model.device import describe, this_machine
    from llmtrain.train.checks import needs_gpu

    here = this_machine()
    login = "" if here.cuda else (
        "; this machine has no GPU, which is fine for validate: run finetune on a GPU node"
    )
    if args.gpu is not None:
        preset = get_gpu(args.gpu)
        return preset.node(), (
            f"target: a CUDA GPU node of {preset.name} (--gpu was given"
            + ("" if preset.bf16 else ": no bf16, fp16 with loss scaling; no flash-attn 2")
            + f"){login}"
        ), False
    if here.cuda:
        return here, f"target: this machine ({describe()})", True
    if not (args.assume_gpu or needs_gpu(cfg)):
        return here, "target: this machine (CPU)", True
    why = "--assume-gpu was given" if args.assume_gpu else "the config needs a GPU"
    return get_gpu(DEFAULT_GPU).node(), (
        f"target: a CUDA GPU node, A100 or later ({why}){login} (--gpu v100 checks for a V100)"
    ), False


def _plan(cfg: RunConfig, args: argparse.Namespace, target: Hardware) -> RunPlan:
    """The plan finetune would make on `target`, in a world of --nodes x --gpus-per-node
    processes."""
    from llmtrain.model.load import attention_support, load_model_config

    config = load_model_config(cfg.model)
    world = World(rank=0, local_rank=0, world_size=args.nodes * args.gpus_per_node)
    return RunPlan.build(
        cfg, world, target, attention_support=attention_support(config),
        model_type=config.model_type,
    )


def _memory(
    cfg: RunConfig, args: argparse.Namespace, plan: RunPlan | None, sampled: list[int]
) -> tuple[list[str], list[str]]:
    """The memory estimate's lines and warnings (on a GPU node: `plan`, else the GPU node's);
    an architecture the estimator does not cover is reported, not refused: finetune trains it
    all the same. Tokens per micro-batch come from the prepared data's lengths, else from
    those of the rows the checks tokenized."""
    import numpy as np

    from llmtrain.sizing import from_config as sizing
    from llmtrain.sizing import tokens
    from llmtrain.sizing.memory import NotEstimable

    # --gpu, else this machine's GPU when the checks are for it, else the default preset.
    named = get_gpu(args.gpu) if args.gpu else (this_gpu() if plan is not None else None)
    gpu = named or get_gpu(DEFAULT_GPU)
    measured = tokens.from_prepared(cfg)
    if measured is None and sampled:
        measured = tokens.Measured(np.asarray(sampled), f"{len(sampled)} tokenized sample rows")
    try:
        lines, fits = sizing.summary(cfg, gpu, args.nodes, args.gpus_per_node, plan, measured)
    except NotEstimable as exc:
        return [f"memory per GPU: the estimate is not available for this architecture "
                f"({exc.problem}; {exc.fix})"], []
    if named is None:
        # Without --gpu the verdict is for the default preset, whatever this machine is: say so.
        where = "the plan of a GPU node, not this CPU's" if plan is None else (
            "the plan of an A100 or later"
        )
        lines[0] += f" (no --gpu: the default preset {DEFAULT_GPU}, {where}; --gpu names another)"
    warnings = [] if fits else [
        f"the run is estimated not to fit a {gpu.name} GPU: see `llmtrain estimate "
        f"{args.config}` for strategies and micro-batches that do"
    ]
    return lines, warnings


def run(args: argparse.Namespace) -> int:
    from llmtrain.train.checks import run_checks

    cfg = load_config(args.config, args.overrides)
    target, target_line, trains_here = _target(cfg, args)
    report = run_checks(cfg, target=target, trains_here=trains_here)
    plan = _plan(cfg, args, target)
    lines, warnings = _memory(cfg, args, plan if target.cuda else None, report.lengths)
    plan_lines = ["plan (as finetune would decide on the target):", *plan.lines()]
    for line in [target_line, *report.lines, *plan_lines, *lines]:
        print(line)
    for warning in report.warnings + warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {args.config} is valid")
    return 0
