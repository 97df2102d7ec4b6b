"""python -m bench.peer SPEC OUT: the strongest peer, in its own process and Python environment.

The peer is what a user who cares about speed runs today: the newest transformers, peft and
accelerate with liger-kernel (`apply_liger_kernel_to_llama`: RoPE, RMSNorm, SwiGLU, fused linear
cross-entropy), `optim="adamw_torch_fused"`, bf16, SDPA, and for instruction data padding-free
packing (`DataCollatorWithFlattening`) kept apart per sample by SDPA with a dense block-diagonal
mask or by `flex_attention` with a block mask; `torch_compile=True` as its own variants.

`python -m bench --peer-python PATH` writes SPEC (bench/peer_launch.py): the model directory,
the rows, the exact sample order, the workload's batch, learning rate and LoRA settings, the
variants. This process trains each variant with the HF Trainer on that order, measures it with
the same Probe (bench/probe.py) as the baseline and llmtrain, and writes OUT (JSON): per variant
the RunResult (per-step timing, peak memory, per-step samples, checksums and losses) or the
error. It imports nothing of the pinned stack: only transformers 5.x, peft, accelerate,
liger-kernel, torch and bench.probe.

Before training a packed variant, `packed_check` runs the first step's samples through the
training collator and the model and compares every sample's logits and loss with the sample run
alone; the same packed row with an all-ones attention mask (samples attending to each other) is
the control that shows the check can see a leak.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import itertools
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from bench.probe import Probe, fresh_memory
from llmtrain.labels import IGNORE_INDEX

# Variant name -> (attention implementation, torch_compile). The flex variants only apply to
# packed (variable-length) workloads: fixed rows need no mask and SDPA's causal kernel is best.
VARIANTS: dict[str, tuple[str, bool]] = {
    "peer": ("sdpa", False),
    "peer+compile": ("sdpa", True),
    "peer flex": ("flex_attention", False),
    "peer flex+compile": ("flex_attention", True),
}
DEFAULT_FIXED = ("peer", "peer+compile")
DEFAULT_PACKED = ("peer", "peer flex", "peer flex+compile")
CHECK_SAMPLES = 4  # of the first step, in the packed check


class PackedLeak(Exception):
    """Packed samples attend to each other (or the check cannot tell that they do not)."""


def variants_for(names: list[str], packed: bool) -> list[str]:
    """The asked variants that apply to this workload (flex only to packed data)."""
    return [n for n in names if packed or VARIANTS[n][0] == "sdpa"]


class Rows(Dataset[dict[str, list[int]]]):
    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


class FixedOrder(Sampler[int]):
    """The sample order the launcher wrote: the one the baseline's EpochSeededSampler drew."""

    def __init__(self, order: list[int]) -> None:
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)


def sample_losses(logits: torch.Tensor, labels: torch.Tensor, bounds: list[int]) -> list[float]:
    """Mean next-token loss of each sample [bounds[i], bounds[i+1]) of one row (logits [L, V])."""
    out = []
    for start, end in itertools.pairwise(bounds):
        loss = torch.nn.functional.cross_entropy(
            logits[start : end - 1].float(), labels[start + 1 : end], ignore_index=IGNORE_INDEX
        )
        out.append(loss.item())
    return out


@torch.no_grad()
def packed_check(
    model: Any,
    collate: Callable[[list[dict[str, list[int]]]], dict[str, torch.Tensor]],
    features: list[dict[str, list[int]]],
    tolerance: float,
) -> dict[str, Any]:
    """Per-sample logits and losses of the packed row against each sample run alone.

    `collate` is the training collator (one row [1, L] with input_ids, labels, position_ids and
    whatever else it gives the model, which gets all of it but the labels).
    Returns max_loss_rel_diff, max_logit_diff (packed vs alone), leak_logit_diff (the same row
    with an all-ones attention mask, where samples do attend to earlier ones) and ok: the losses
    agree within `tolerance` and the packed logits are closer to the lone ones than the leaking
    ones are by at least 4x. Runs in eval mode under the training autocast; restores train mode.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    batch = {k: v.to(device) for k, v in collate(features).items()}
    ids, labels = batch["input_ids"], batch["labels"][0]
    lengths = [len(f["input_ids"]) for f in features]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with autocast:
        packed = model(**inputs).logits[0]  # all the collator gives the model, as in training
        leak = model(
            input_ids=ids, position_ids=batch["position_ids"], attention_mask=torch.ones_like(ids)
        ).logits[0]
        alone = [
            model(
                input_ids=torch.tensor([f["input_ids"]], device=device),
                position_ids=torch.arange(n, device=device)[None],
            ).logits[0]
            for f, n in zip(features, lengths, strict=True)
        ]
    alone_cat = torch.cat(alone).float()
    lone_labels = torch.cat([torch.tensor(f["labels"], device=device) for f in features])
    got = sample_losses(packed, labels, bounds)
    want = sample_losses(alone_cat, lone_labels, bounds)
    loss_diff = max(abs(g - w) / abs(w) for g, w in zip(got, want, strict=True))
    logit_diff = (packed.float() - alone_cat).abs().max().item()
    leak_diff = (leak.float() - alone_cat).abs().max().item()
    model.train(was_training)
    return {
        "samples": len(features),
        "max_loss_rel_diff": loss_diff,
        "max_logit_diff": logit_diff,
        "leak_logit_diff": leak_diff,
        "tolerance": tolerance,
        "ok": loss_diff <= tolerance and 4 * logit_diff < leak_diff,
    }


def load_model(spec: dict[str, Any], attention: str, gpu: bool) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    work = spec["workload"]
    lora = work["method"] == "lora"
    model: Any = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"],
        dtype=torch.bfloat16 if lora and gpu else torch.float32,
        attn_implementation=attention,
    )
    if lora:
        cfg = spec["lora"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg["r"],
                lora_alpha=cfg["alpha"],
                lora_dropout=cfg["dropout"],
                target_modules=cfg["target_modules"],
                task_type="CAUSAL_LM",
            ),
        )
    # Training keeps no KV cache; with one, transformers 5.x keeps no packed sample apart (the
    # Trainer sets this too, but not in every 5.x release).
    model.config.use_cache = False
    return model.to("cuda" if gpu else "cpu")


def run_variant(spec: dict[str, Any], rows: Rows, name: str, out: Path, probe: Probe) -> None:
    from transformers import (
        DataCollatorWithFlattening,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    class PeerTrainer(Trainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> FixedOrder:
            return FixedOrder(spec["order"])

    fresh_memory()
    gpu = torch.cuda.is_available()
    work = spec["workload"]
    attention, compile_ = VARIANTS[name]
    model = load_model(spec, attention, gpu)
    collate: Any = DataCollatorWithFlattening() if work["variable"] else default_data_collator
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=work["batch"],
        gradient_accumulation_steps=work["accumulation"],
        max_steps=probe.warmup + probe.steps,
        learning_rate=work["learning_rate"],
        optim="adamw_torch_fused",
        bf16=gpu,
        torch_compile=compile_,
        dataloader_num_workers=2 if gpu else 0,
        remove_unused_columns=False,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        seed=spec["seed"],
        disable_tqdm=True,
    )
    trainer = PeerTrainer(
        model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[probe]
    )
    if work["variable"]:
        # On the model as the Trainer will train it (after it has set its config).
        first = [rows[i] for i in spec["order"][: min(work["batch"], CHECK_SAMPLES)]]
        check = packed_check(model, collate, first, tolerance=1e-2 if gpu else 1e-4)
        probe.result.notes["packed_check"] = check
        if not check["ok"]:
            raise PackedLeak(f"packed samples attend to each other: {check}")
        fresh_memory()  # the check's logits are not the training's peak
    trainer.train()
    probe.result.notes.update(
        attention=model.config._attn_implementation,
        collator=type(collate).__name__ if work["variable"] else "default_data_collator",
        torch_compile=compile_,
        liger=spec["liger"],
    )
    del trainer, model


def versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "liger-kernel", "triton"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peer", description=__doc__.split("\n")[0]
    )
    parser.add_argument("spec", type=Path, help="JSON written by bench/peer_launch.py")
    parser.add_argument("out", type=Path, help="where to write the results (JSON)")
    args = parser.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    rows = Rows([json.loads(line) for line in Path(spec["rows"]).read_text().splitlines()])
    if spec["liger"]:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        # Patches the Llama classes of this process: every variant below runs with Liger.
        apply_liger_kernel_to_llama(
            rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True
        )
    torch._dynamo.config.cache_size_limit = 64  # as python -m bench: one process, many shapes
    report: dict[str, Any] = {
        "packages": versions(),
        "liger": spec["liger"],
        "liger_note": spec["liger_note"],
        "runs": [],
    }
    for name in variants_for(spec["variants"], spec["workload"]["variable"]):
        print(f"== peer: {name}", file=sys.stderr, flush=True)
        probe = Probe(name, spec["warmup"], spec["steps"])
        run: dict[str, Any] = {"run": name}
        try:
            run_variant(spec, rows, name, Path(spec["work_dir"]) / name.replace(" ", "_"), probe)
        except Exception as exc:  # an OOM or a failed compile is a result: the peer cannot
            traceback.print_exc()
            run["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        run["raw"] = probe.result.as_dict()
        report["runs"].append(run)
        gc.collect()
        args.out.write_text(json.dumps(report, indent=1) + "\n")  # each variant, as it ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
