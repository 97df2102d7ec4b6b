"""Training compute: FLOPs, wall time at a given MFU, GPU-hours and PF-days.

Model FLOPs follow Kaplan et al. (2020) and the GPT-3 paper's Table D.1: 6 x N per token for
training (2N forward, 4N backward), plus PaLM's (Chowdhery et al. 2022, appendix B) attention
term 12 x layers x hidden x seq per token. Recomputation under gradient checkpointing is not
model FLOPs: it lowers the achieved MFU instead, which is how MFU is defined.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmtrain.sizing.memory import ModelShape, RunShape, trainable_params

PFLOP_DAY = 1e15 * 86400
DEFAULT_MFU = 0.35  # a typical Hugging Face Trainer run on A100/H100; pass a measured one


def training_flops(params: float, tokens: float, flops_per_param_token: float = 6.0) -> float:
    return flops_per_param_token * params * tokens


def pf_days(flops: float) -> float:
    return flops / PFLOP_DAY


def attention_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    return 12.0 * shape.layers * shape.hidden * seq_len


def flops_per_token(shape: ModelShape, run: RunShape) -> float:
    """Forward 2N; backward 2N for activation gradients (through every block above the lowest
    trainable one, taken as all) and 2 x trainable for weight gradients; attention likewise."""
    n, nt = shape.params, trainable_params(shape, run)
    attn = attention_flops_per_token(shape, run.seq_len)
    if run.method == "inference":
        return 2 * n + attn / 3
    return 4 * n + 2 * nt + attn


@dataclass(frozen=True)
class ComputeEstimate:
    flops: float
    gpus: int
    peak_tflops: float
    mfu: float

    @property
    def seconds(self) -> float:
        return self.flops / (self.gpus * self.peak_tflops * 1e12 * self.mfu)

    @property
    def gpu_hours(self) -> float:
        return self.seconds * self.gpus / 3600

    @property
    def pf_days(self) -> float:
        return pf_days(self.flops)


def estimate_compute(
    shape: ModelShape, run: RunShape, tokens: float, peak_tflops: float, mfu: float = DEFAULT_MFU
) -> ComputeEstimate:
    return ComputeEstimate(flops_per_token(shape, run) * tokens, run.world, peak_tflops, mfu)
