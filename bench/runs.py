"""The two sides of the comparison, on the same model directory, rows and sample order.

The baseline is what the clusters' guides run: the HF Trainer with its defaults, padding to the
longest sample of each batch (DataCollatorForSeq2Seq), SDPA attention, torch AdamW
(`adamw_torch`), bf16 autocast, no DataLoader workers; fp32 weights for a full fine-tune, bf16
frozen weights for LoRA. Its only change is the sampler: llmtrain's epoch-seeded order, so both
sides see the same samples in every step (speed does not depend on which random order).

The other side is `llmtrain.train.run.train`, the path of `llmtrain finetune`, on a prepared
dataset written from the same rows; `overrides` choose which of its levers are on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainingArguments,
)

from bench.probe import Probe, fresh_memory
from bench.workloads import LENGTH_DISTRIBUTION, Workload
from llmtrain.config import RunConfig, apply_overrides
from llmtrain.data import prepared
from llmtrain.data.sampling import EpochSeededSampler
from llmtrain.model.load import load_tokenizer
from llmtrain.plan import World
from llmtrain.sizing import from_config as sizing
from llmtrain.sizing import tokens
from llmtrain.sizing.memory import estimate
from llmtrain.train.run import train

SEED = 42
LORA: dict[str, Any] = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ["q_proj", "v_proj"],
}


class BaselineTrainer(Trainer):
    def _get_train_sampler(self, *args: Any) -> EpochSeededSampler:  # 5.x passes the dataset
        return EpochSeededSampler(len(self.train_dataset), self.args.seed)


def run_baseline(
    work: Workload, model_dir: Path, rows: datasets.Dataset, out: Path, probe: Probe
) -> None:
    from peft import LoraConfig, get_peft_model

    fresh_memory()
    gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # as SFT guides set it for training
    lora = work.method == "lora"
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_dir,
        torch_dtype=torch.bfloat16 if lora and gpu else torch.float32,
        attn_implementation="sdpa",
    )
    if lora:
        model = get_peft_model(
            model,
            LoraConfig(
                r=LORA["r"],
                lora_alpha=LORA["alpha"],
                lora_dropout=LORA["dropout"],
                target_modules=LORA["target_modules"],
                task_type="CAUSAL_LM",
            ),
        )
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=work.batch,
        gradient_accumulation_steps=work.accumulation,
        max_steps=probe.warmup + probe.steps,
        learning_rate=work.learning_rate,
        optim="adamw_torch",
        bf16=gpu,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        seed=SEED,
        disable_tqdm=True,
    )
    trainer = BaselineTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest"),
        callbacks=[probe],
    )
    trainer.train()
    probe.result.notes["attention"] = "sdpa"


def llmtrain_config(work: Workload, model_dir: Path, out: Path) -> dict[str, Any]:
    return {
        "model": {"path": str(model_dir)},
        "data": {
            "path": str(out / "workload.jsonl"),
            "shape": "instruction" if work.variable else "text",
            "prompt_template": "{prompt}" if work.variable else None,
            "response_template": "{response}" if work.variable else None,
            "max_length": work.seq_len,
            "packing": "padding_free" if work.variable else "none",
            "prepared_dir": str(out / "prepared"),
        },
        "method": {"name": work.method},
        "lora": LORA,
        "training": {
            "per_device_train_batch_size": work.batch,
            "gradient_accumulation_steps": work.accumulation,
            "learning_rate": work.learning_rate,
            "lr_scheduler_type": "linear",
            "logging_steps": 10_000,
            "save_steps": 100_000,
            "report_to": ["none"],
            "seed": SEED,
        },
        "generation": {"samples": 0},
        "output": {"dir": str(out), "resume": "never"},
    }


def write_prepared(cfg: RunConfig, rows: datasets.Dataset, work: Workload) -> None:
    """llmtrain's prepared-data layout, made from the rows instead of by tokenizing text: the
    data file names the workload, and the fingerprint is the one finetune will look for."""
    spec = Path(cfg.data.path)
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(
        json.dumps({"workload": work.describe, "rows": len(rows), "seed": SEED,
                    "lengths": LENGTH_DISTRIBUTION if work.variable else None}) + "\n"
    )  # fmt: skip
    target = cfg.prepared_dir()
    rows.save_to_disk(str(target / "train"))
    fingerprint = prepared.fingerprint(cfg, load_tokenizer(cfg.model))
    info = {"fingerprint": fingerprint, "stats": {"rows": len(rows)}, "splits": ["train"]}
    (target / prepared.INFO).write_text(json.dumps(info))


def run_llmtrain(
    work: Workload,
    model_dir: Path,
    rows: datasets.Dataset,
    out: Path,
    probe: Probe,
    overrides: list[str],
) -> None:
    fresh_memory()
    raw = apply_overrides(llmtrain_config(work, model_dir, out), overrides)
    raw["training"]["max_steps"] = probe.warmup + probe.steps
    cfg = RunConfig.model_validate(raw)
    write_prepared(cfg, rows, work)
    shape = sizing.model_shape(cfg)
    # as `llmtrain estimate` predicts it, from the prepared rows' lengths
    predicted = estimate(shape, sizing.run_shape(cfg, shape, measured=tokens.from_prepared(cfg)))
    probe.result.notes["predicted_allocated_bytes"] = predicted.allocated
    trainer = train(cfg, World(rank=0, local_rank=0, world_size=1), extra_callbacks=[probe])
    attention = {getattr(m, "_llmtrain_kernel", None) for m in trainer.model.modules()} - {None}
    probe.result.notes["attention"] = ", ".join(sorted(attention)) or "sdpa"  # type: ignore[arg-type]
    probe.result.notes["overrides"] = overrides
    del trainer
