"""What a batch log shows of a run (RunReport), and eval on by default with held-out data."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
from transformers import TrainerControl, TrainerState

from llmtrain import stack
from llmtrain.config import RunConfig, load_config
from llmtrain.data.tokenize import TokenizeStats
from llmtrain.plan import World
from llmtrain.train import hf_names
from llmtrain.train.callbacks import METRICS, RunReport
from llmtrain.train.run import plan_run, training_arguments

REPO = Path(__file__).resolve().parents[2]
ONE = World(rank=0, local_rank=0, world_size=1)


def _arguments(cfg: RunConfig, out: Path, has_eval: bool):  # type: ignore[no-untyped-def]
    return training_arguments(cfg, ONE, plan_run(cfg, ONE), out, has_eval, None)


def lora_args(out: Path):  # type: ignore[no-untyped-def]
    return _arguments(load_config(REPO / "configs" / "demo.yaml"), out, True)


@pytest.mark.parametrize(
    ("overrides", "has_eval", "strategy", "steps"),
    [
        # configs/demo.yaml: 10% held out, no eval_steps
        (["training.save_steps=50"], True, "steps", 50),
        (["training.save_steps=50", "training.eval_steps=7"], True, "steps", 7),
        (["training.save_steps=50"], False, "no", None),
    ],
)
def test_held_out_data_is_evaluated_by_default_at_the_save_interval(
    tmp_path: Path, overrides: list[str], has_eval: bool, strategy: str, steps: int | None
) -> None:
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    args = _arguments(cfg, tmp_path, has_eval)
    assert hf_names.eval_strategy(args) == strategy
    assert args.eval_steps == steps


def report(tmp_path: Path, progress_lines: bool = True) -> RunReport:
    stats = TokenizeStats(rows=10, kept=9, dropped_too_long=1, tokens=900, loss_tokens=90)
    args = lora_args(tmp_path)
    r = RunReport(tmp_path, stats, (100, 1000), progress_lines=progress_lines)
    state = TrainerState(max_steps=20, global_step=0, epoch=0.0, is_world_process_zero=True)
    r.on_train_begin(args, state, TrainerControl())
    return r


def test_progress_line_at_each_log_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    r = report(tmp_path)
    args = lora_args(tmp_path)
    state = TrainerState(max_steps=20, global_step=5, epoch=1.0, is_world_process_zero=True)
    with caplog.at_level(logging.INFO, logger="llmtrain"):
        r.on_log(args, state, TrainerControl(), logs={"loss": 1.25, "learning_rate": 1e-3})
        r.on_log(args, state, TrainerControl(), logs={"eval_loss": 1.5})
    progress, evaluation = (rec.getMessage() for rec in caplog.records)
    match = re.fullmatch(
        r"step 5/20 \(25%\), loss 1\.2500, lr 0\.001, ([\d,]+) tokens/s, eta (\d+):(\d\d):(\d\d)",
        progress,
    )
    assert match, progress
    assert int(match[1].replace(",", "")) > 0
    assert evaluation == "step 5/20: eval loss 1.5000"


def test_no_progress_lines_on_a_terminal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    r = report(tmp_path, progress_lines=False)
    state = TrainerState(max_steps=20, global_step=5, epoch=1.0, is_world_process_zero=True)
    with caplog.at_level(logging.INFO, logger="llmtrain"):
        r.on_log(None, state, TrainerControl(), logs={"loss": 1.0})  # type: ignore[arg-type]
    assert caplog.records == []


def test_the_last_step_is_evaluated(tmp_path: Path) -> None:
    r = report(tmp_path)
    control = TrainerControl()
    r.on_step_end(None, TrainerState(max_steps=20, global_step=19), control)  # type: ignore[arg-type]
    assert not control.should_evaluate
    r.on_step_end(None, TrainerState(max_steps=20, global_step=20), control)  # type: ignore[arg-type]
    assert control.should_evaluate


def test_summary_names_method_data_losses_time_and_outputs(tmp_path: Path) -> None:
    r = report(tmp_path)
    records = [
        {"step": 2, "loss": 3.0},
        {"step": 4, "loss": 2.0},
        {"step": 4, "eval_loss": 2.5},
        {"step": 6, "loss": 1.0},
        {"step": 6, "eval_loss": 2.75},
    ]
    (tmp_path / METRICS).write_text("".join(json.dumps(x) + "\n" for x in records))
    r.on_train_end(None, TrainerState(max_steps=6, global_step=6, epoch=2.0), TrainerControl())  # type: ignore[arg-type]
    (tmp_path / "final").mkdir()
    text = r.summary(
        "lora",
        {
            "final adapter": tmp_path / "final",
            "merged": tmp_path / "absent",
            "metrics": tmp_path / METRICS,
        },
    )
    lines = text.splitlines()
    assert lines[0] == "run summary"
    assert "  method: lora, 100 of 1,000 parameters trained (10.000%)" in lines
    assert "  data: 9/10 rows kept (0 truncated, 1 dropped as too long" in text
    assert "  loss: 3.0000 -> 1.0000 (3 log steps)" in lines
    assert "  eval loss: 2.5000 -> 2.7500 at step 6 (lowest 2.5000 at step 4)" in lines
    assert re.search(r"^  time: \d+:\d\d:\d\d for 6 steps, [\d,]+ tokens/s$", text, re.MULTILINE)
    assert f"    final adapter: {tmp_path / 'final'}" in lines
    assert f"    metrics: {tmp_path / METRICS}" in lines
    assert "merged" not in text  # outputs that do not exist are not listed


@pytest.mark.parametrize(
    ("overrides", "expected"), [([], False), (["training.args.logging_nan_inf_filter=true"], True)]
)
def test_hf_nan_filter_is_off_unless_asked_for(
    tmp_path: Path, overrides: list[str], expected: bool
) -> None:
    """HF's NaN filter reads each micro-batch's loss on the host, a sync per micro-batch
    (bench/RESULTS.md, 2026-12-01); LossRecorder keeps the exact losses instead."""
    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    assert _arguments(cfg, tmp_path, False).logging_nan_inf_filter is expected


@pytest.mark.parametrize(
    ("overrides", "expected"), [([], False), (["training.args.dataloader_pin_memory=true"], True)]
)
def test_batches_are_not_pinned_without_a_gpu_unless_asked_for(
    tmp_path: Path, overrides: list[str], expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pinned memory serves only the copy to a GPU: on CPU, torch warned at every DataLoader pass
    (each eval of `make smoke`) that it was unused. A GPU machine keeps HF's default, true."""
    import torch

    cfg = load_config(REPO / "configs" / "demo.yaml", overrides)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # transformers 5.x turns pinning off itself under use_cpu, which llmtrain sets without a GPU.
    pinned = expected and not stack.is_current()
    assert _arguments(cfg, tmp_path, False).dataloader_pin_memory is pinned


def test_each_trainer_in_one_process_writes_tensorboard_events_under_its_own_output_dir(
    tmp_path: Path,
) -> None:
    """A second run in the same process (a notebook, a sweep, the test suite) must not write
    its events into the first run's directory, nor leave a directory in the environment that
    the programs it starts inherit (found on the current stack: TENSORBOARD_LOGGING_DIR)."""
    import os

    from transformers import AutoModelForCausalLM

    from llmtrain.train.trainer import TENSORBOARD_DIR, LlmtrainTrainer, LossRecorder

    model = AutoModelForCausalLM.from_pretrained(REPO / "src/llmtrain/embedded/tiny-llama")
    before = os.environ.get("TENSORBOARD_LOGGING_DIR")
    for run in ("first", "second"):
        out = tmp_path / run
        args = _arguments(load_config(REPO / "configs" / "demo.yaml"), out, False)
        assert args.report_to == ["tensorboard"]
        trainer = LlmtrainTrainer(
            model=model, args=args, recorder=LossRecorder(), chunked_loss=False
        )
        state = TrainerState(is_world_process_zero=True)
        trainer.callback_handler.on_train_begin(args, state, TrainerControl())
        trainer.callback_handler.on_train_end(args, state, TrainerControl())
        assert list((out / TENSORBOARD_DIR).glob("events.out.tfevents.*")), run
        assert os.environ.get("TENSORBOARD_LOGGING_DIR") == before
    assert not list(tmp_path.rglob("runs"))  # 5.x's default directory, never ours


def test_summary_names_the_last_steps_weights_and_the_best_checkpoint_apart(
    tmp_path: Path,
) -> None:
    """A newcomer could not tell whether final/adapter was the best eval's checkpoint or the
    last step's: the summary says which, and where the best one is."""
    from llmtrain.train.checkpoints import BEST
    from llmtrain.train.run import summary_outputs

    final = tmp_path / "final" / "adapter"
    no_eval = summary_outputs(tmp_path, final)
    assert no_eval["final adapter (the last step's)"] == final
    assert not no_eval["best checkpoint (lowest eval loss)"].exists()  # left out of the summary
    (tmp_path / "checkpoint-150").mkdir()
    (tmp_path / BEST).write_text("checkpoint-150\n")
    best = summary_outputs(tmp_path, final)["best checkpoint (lowest eval loss)"]
    assert best == tmp_path / "checkpoint-150"


def test_the_plan_not_the_environment_sets_mixed_precision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """TrainingArguments starts from ACCELERATE_MIXED_PRECISION and writes it back only for
    bf16 or fp16: a bf16 value left by an earlier run in this process (or by accelerate launch)
    made this fp32 CPU run train under bf16 autocast (its logits were bf16 steps apart from the
    reloaded model's: tests/e2e/test_reload.py after tests/unit/test_master_weights.py)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"output.dir={tmp_path}"])
    with caplog.at_level("WARNING"):
        _arguments(cfg, tmp_path, has_eval=False)
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no"
    assert "ACCELERATE_MIXED_PRECISION=bf16" in caplog.text and "the plan's no" in caplog.text
