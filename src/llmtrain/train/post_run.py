"""After the final save: merge and sample generations. Nothing here fails a finished run."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from llmtrain.config import RunConfig
from llmtrain.data import prompts
from llmtrain.model.export import load_for_inference, merge
from llmtrain.model.generation import generate, write_jsonl
from llmtrain.plan import RunPlan
from llmtrain.train import demo_eval

log = logging.getLogger(__name__)


def post_run(cfg: RunConfig, plan: RunPlan, final: Path, out: Path) -> None:
    """Merge (output.merge) and sample generations (generation.samples) from the saved final
    result. The run is finished once `final` is saved: a step that fails here is logged as a
    warning with the command that redoes it, and the run still exits 0, because any other
    code would make the job script requeue (and train again) a run whose result is saved."""
    is_adapter = plan.adapter
    inference_dir = final
    if is_adapter and cfg.output.merge:
        merged = out / "final" / "merged"
        redo = f"llmtrain merge --base {cfg.model.path} --adapter {final} --out {merged}"
        if _attempt("merge", final, redo, lambda: merge(cfg.model, final, merged)):
            inference_dir = merged
    if cfg.generation.samples and cfg.data.shape != "text":
        option = "--adapter" if is_adapter and inference_dir == final else "--model"
        redo = (
            f"llmtrain generate {out / 'config.yaml'} {option} {inference_dir} "
            f"--out {out / 'generations.jsonl'}"
        )
        _attempt(
            "sample generation",
            final,
            redo,
            lambda: _samples(cfg, plan, final, inference_dir, out),
        )


def _attempt(step: str, final: Path, redo: str, work: Callable[[], object]) -> bool:
    """Run one post-run step; any failure is a warning (see post_run). Returns: it worked."""
    try:
        work()
    except Exception as exc:  # any failure: nothing after the final save fails the run
        log.warning(
            "%s after training failed (%s: %s); the final result in %s is saved and complete, "
            "so the run counts as finished (exit 0). To redo it: %s",
            step,
            type(exc).__name__,
            exc,
            final,
            redo,
        )
        return False
    return True


def _samples(cfg: RunConfig, plan: RunPlan, final: Path, inference_dir: Path, out: Path) -> None:
    """generation.samples answers to held-out rows, to generations.jsonl and the log."""
    is_adapter = plan.adapter
    if inference_dir == final and is_adapter:
        model, tok = load_for_inference(cfg.model, final, quantized=plan.quantized)
    else:
        model, tok = load_for_inference(
            cfg.model.model_copy(update={"path": str(inference_dir), "tokenizer": None}), None
        )
    sources, held_out = prompts.held_out_rows(cfg)
    asked = prompts.from_sources(sources, tok, cfg.generation.samples)
    outputs = generate(model, tok, asked.prompts, cfg.generation)
    del model  # one model in memory at a time: the base model is loaded next
    base, _ = load_for_inference(cfg.model, None, quantized=plan.quantized)
    before = generate(base, tok, asked.prompts, cfg.generation)
    write_jsonl(
        out / "generations.jsonl",
        asked.prompts,
        outputs,
        cfg.generation,
        asked.references,
        asked.conversations,
        before=before,
    )
    refs = asked.references or [""] * len(outputs)
    compared = demo_eval.Comparison(asked.prompts, refs, before, outputs, held_out)
    compared.save(out / "samples.json")
    print(compared.table(), file=sys.stderr)
