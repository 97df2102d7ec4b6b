"""One LoRA linear layer on this GPU, forward + backward: peft 0.9.0's forward against llmtrain's
fused one (src/llmtrain/kernels/lora.py), at the 7B LoRA workload's shape.

bf16 frozen base weight, fp32 adapter weights, autocast bf16: how llmtrain trains LoRA. The
input requires a gradient, as inside a model. For each token count: GPU ms per call and per
training step (x the adapted layers: q_proj and v_proj of 32 blocks), the CPU time to issue a
call, the memory the call keeps for its backward, and the largest difference of outputs and
gradients; writes lora_linear.json to --out.

  python -m bench.lora_linear --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from bench.attention import publish, timed
from llmtrain.kernels import lora as fused_lora

# features, rank, alpha, adapted layers per step
SHAPE = {"features": 4096, "r": 16, "alpha": 32, "layers": 64}
# tokens per call: a fixed-length micro-batch (4 x 2048); a packed row of four instruction
# samples (var-7b-lora: 18,645 tokens in 13 steps)
TOKENS = (8192, 1434)


def peft_layer() -> nn.Module:
    torch.manual_seed(0)
    f = SHAPE["features"]
    m = LoraLinear(nn.Linear(f, f, bias=False), "default", r=SHAPE["r"], lora_alpha=SHAPE["alpha"])
    m.base_layer.to(torch.bfloat16).requires_grad_(False)
    nn.init.normal_(m.lora_B["default"].weight, std=0.02)  # type: ignore[arg-type]
    return m.cuda()


def saved_bytes(m: nn.Module, x: torch.Tensor) -> int:
    """Memory still held after the forward: what the backward will read."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x)
    held = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    del out
    return held


def host_us(call: Callable[[], torch.Tensor], grad: torch.Tensor, repeats: int = 20) -> float:
    """CPU time to issue one forward + backward (the GPU queue keeps it from blocking)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call().backward(grad)
    spent = time.perf_counter() - start
    torch.cuda.synchronize()
    return spent / repeats * 1e6


def measure(tokens: int) -> dict[str, Any]:
    x = torch.randn(1, tokens, SHAPE["features"], device="cuda", dtype=torch.bfloat16)
    x.requires_grad_()
    grad = torch.randn_like(x)
    # Drop x's gradient after each backward, so no timed call pays for accumulating it.
    dropping = x.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))
    reference = peft_layer()
    fused = copy.deepcopy(reference)
    fused_lora.patch(fused)
    results: dict[str, dict[str, float]] = {}
    grads: dict[str, list[torch.Tensor]] = {}
    for name, m in (("peft", reference), ("fused", fused)):

        def call(m: nn.Module = m) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out: torch.Tensor = m(x)
                return out

        ms = timed(call, grad)
        results[name] = {
            "ms_per_call": ms,
            "ms_per_step": ms * SHAPE["layers"],
            "host_us_per_call": host_us(call, grad),
            "saved_MiB": saved_bytes(m, x) / 2**20,
        }
        dropping.remove()
        for t in (x, *m.parameters()):
            t.grad = None
        out = call()
        out.backward(grad)
        assert x.grad is not None
        grads[name] = [out.detach().float(), x.grad.float()]
        grads[name] += [p.grad for p in m.parameters() if p.grad is not None]
        dropping = x.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))
    return {
        "tokens": tokens,
        "results": results,
        "speedup": results["peft"]["ms_per_call"] / results["fused"]["ms_per_call"],
        "max_rel_diff": [
            float((a - b).abs().max() / b.abs().max())
            for a, b in zip(grads["fused"], grads["peft"], strict=True)
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    args = parser.parse_args()
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["shape"] = SHAPE
    report["by_tokens"] = [measure(n) for n in TOKENS]
    publish(report, args.out / "lora_linear.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
