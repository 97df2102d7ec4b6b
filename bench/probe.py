"""What one training run did, measured from inside the HF Trainer the same way for every run.

A forward pre-hook on the model counts, for every micro-batch as the model receives it, the
tokens (padding included), the real tokens, the tokens that carry loss, the samples, the sum of
squared sample lengths (for attention FLOPs) and a checksum of the samples' content; a forward
hook keeps the loss. All stay on the device until the run ends, so measuring adds no host sync.
An empty micro-batch (one token: llmtrain's filler of a token-budget step, training.
tokens_per_batch) counts as nothing, and a step's loss is the token-weighted mean over its
micro-batches. The clock runs from the end of the last warm-up step to the end of the last timed
step, with torch.cuda.synchronize() at both ends.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from bench.gaps import SyncCensus, idle_report
from llmtrain.labels import IGNORE_INDEX


@dataclass
class RunResult:
    name: str
    seconds: float = 0.0
    timed_steps: int = 0
    tokens: int = 0  # in the timed steps, padding included
    real_tokens: int = 0
    loss_tokens: int = 0
    samples: int = 0
    sum_sq_lengths: int = 0
    peak_bytes: int | None = None
    samples_per_step: list[int] = field(default_factory=list)
    checksums: list[int] = field(default_factory=list)  # one per step, all steps
    losses: list[float] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fresh_memory() -> None:
    """Before a run: collect garbage, release cached blocks, restart the peak count."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batch_stats(kwargs: dict[str, Any]) -> torch.Tensor:
    """[tokens, real tokens, loss tokens, samples, sum of squared lengths, checksum] (int64)."""
    ids: torch.Tensor = kwargs["input_ids"]
    labels: torch.Tensor = kwargs["labels"]
    mask = kwargs.get("attention_mask")
    pos = kwargs.get("position_ids")
    if pos is not None:  # packed rows: a sample starts where its positions restart
        pos = pos.expand_as(ids)
        real = torch.ones_like(ids)
        samples = (pos == 0).sum()
    else:  # one padded sample per row, padded on either side
        real = mask.long() if mask is not None else torch.ones_like(ids)
        pos = (real.cumsum(-1) - 1).clamp(min=0)
        samples = torch.full((), ids.shape[0], device=ids.device)
    loss_tokens = (labels[..., 1:] != IGNORE_INDEX).sum()
    # n^2 = sum over p < n of (2p + 1): squared sample lengths without finding the samples.
    sum_sq = ((2 * pos + 1) * real).sum()
    checksum = (ids * (pos + 1) * real).sum() + 7 * loss_tokens
    # Host numbers become device tensors by a fill kernel, not a copy from pageable memory,
    # which would be a host sync in every run's every micro-batch (set_sync_debug_mode warns).
    values = [torch.full((), ids.numel(), device=ids.device), real.sum(), loss_tokens, samples,
              sum_sq, checksum]
    return torch.stack([v.to(torch.long) for v in values])


# Kernel names -> what they do, first match wins (cuBLAS/CUTLASS GEMMs, the attention kernels,
# Triton's generated kernels: compiled norms, SwiGLU, RoPE, loss chunks; the optimizer).
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "matmul", "sm90_", "sm100_")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("triton", ("triton",)),
    ("copy", ("memcpy", "memset", "copy")),
    ("nccl", ("nccl",)),
)


def kernel_seconds(averages: Any) -> dict[str, float]:
    """Device seconds by kind of kernel (KERNEL_KINDS, the rest "other") over the profiled
    steps, and "total": the sum, which against the steps' wall time is the GPU's busy share."""
    out: dict[str, float] = {}
    for evt in averages:
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue  # CPU ops: their kernels are counted as the kernels' own entries
        if getattr(evt, "is_user_annotation", False):
            continue  # a span on the GPU's timeline (Optimizer.step#AdamW.step), not a kernel
        name = evt.key.lower()
        kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        out[kind] = out.get(kind, 0.0) + evt.device_time_total / 1e6
    out["total"] = sum(out.values())
    return out


class Probe(TrainerCallback):
    def __init__(self, name: str, warmup: int, steps: int, profile: Path | None = None) -> None:
        self.result = RunResult(name)
        self.profile = profile  # write the timed steps' top kernels there (timing then skewed)
        self.profiler: Any = None
        self.census = SyncCensus()
        self.warmup, self.steps = warmup, steps
        self.stats: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.handles: list[Any] = []
        self.t0 = 0.0
        self.first_timed = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]

        def before(module: Any, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
            if module.training:
                stats = batch_stats(kw)
                self.stats.append(stats if kw["input_ids"].numel() > 1 else stats * 0)

        def after(module: Any, a: tuple[Any, ...], kw: dict[str, Any], out: Any) -> None:
            if module.training:
                loss = out["loss"].detach().float()
                tokens = (kw["labels"][..., 1:] != IGNORE_INDEX).sum().float()
                step_items = kw.get("num_items_in_batch")
                if step_items is not None:  # transformers 5.x: this micro-batch's share of the
                    loss = loss * step_items  # step's mean, its sum over the step's label tokens
                elif kw.get("loss_reduction") != "sum":  # a mean; llmtrain's loss is the sum
                    loss = loss * tokens
                if kw["input_ids"].numel() == 1:
                    loss = loss * 0
                self.losses.append(torch.stack([loss, tokens]))

        self.handles = [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True),
        ]

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.warmup:
            _sync()
            self.t0 = time.perf_counter()
            self.first_timed = len(self.stats)
            if self.profile is not None:
                self.profiler = torch.profiler.profile()
                self.profiler.__enter__()
                if torch.cuda.is_available():
                    self.census.start()
        elif state.global_step == self.warmup + self.steps:
            _sync()
            self.result.seconds = time.perf_counter() - self.t0
            self.result.timed_steps = self.steps
            if self.profiler is not None:
                syncs = self.census.stop() if torch.cuda.is_available() else []
                self.profiler.__exit__(None, None, None)
                assert self.profile is not None
                averages = self.profiler.key_averages()
                self.profile.write_text(
                    averages.table(sort_by="self_device_time_total", row_limit=40)
                )
                self.result.notes["profiled"] = str(self.profile.name)
                self.result.notes["kernel_seconds"] = kernel_seconds(averages)
                self.result.notes["host_syncs"] = syncs
                with tempfile.TemporaryDirectory() as tmp:
                    trace = Path(tmp) / "trace.json"
                    self.profiler.export_chrome_trace(str(trace))
                    try:
                        idle = idle_report(json.loads(trace.read_text()), self.steps)
                    except ValueError as err:  # a CPU run: no GPU timeline to read
                        idle = {"error": str(err)}
                self.result.notes["idle"] = idle

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for h in self.handles:
            h.remove()
        accumulation = args.gradient_accumulation_steps
        table = torch.stack(self.stats).cpu()
        timed = table[self.first_timed :].sum(0).tolist()
        r = self.result
        r.tokens, r.real_tokens, r.loss_tokens, r.samples, r.sum_sq_lengths = timed[:5]
        per_step = table.view(-1, accumulation, table.shape[1]).sum(1)
        r.samples_per_step = per_step[:, 3].tolist()
        r.checksums = per_step[:, 5].tolist()
        sums = torch.stack(self.losses).cpu().view(-1, accumulation, 2).sum(1)
        r.losses = (sums[:, 0] / sums[:, 1].clamp(min=1)).tolist()
        if torch.cuda.is_available():
            r.peak_bytes = torch.cuda.max_memory_allocated()
