"""Causal attention kernels on this GPU, forward + backward, at the bench's model shapes.

Times the kernel llmtrain uses for packed rows (torch's varlen flash attention) against
scaled_dot_product_attention pinned to each of its backends, on full rows of one sample each
(the fixed-length workload). Prints ms per call and per training step (x layers) and writes
attention.json to --out.

  python -m bench.attention --out $OUT
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# name: (batch, seq, q heads, kv heads, head dim, layers), as bench/workloads.py builds them
SHAPES = {"1b": (8, 2048, 32, 4, 64, 22), "7b": (4, 2048, 32, 32, 128, 32)}
FIELDS = ("batch", "seq", "q_heads", "kv_heads", "head_dim", "layers")
BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def timed(fn: Callable[[], torch.Tensor], grad: torch.Tensor, repeats: int = 20) -> float:
    for _ in range(3):
        fn().backward(grad)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn().backward(grad)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def publish(report: dict[str, Any], path: Path) -> None:
    """Write a micro-benchmark's report as JSON and print it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def measure(shape: tuple[int, int, int, int, int, int]) -> dict[str, Any]:
    from llmtrain.kernels import varlen_attention as packing

    b, s, hq, hkv, d, layers = shape
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(b, hq, s, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device=dev, dtype=dt, requires_grad=True)
    grad = torch.randn(b, hq, s, d, device=dev, dtype=dt)
    results: dict[str, Any] = {}
    for name, backend in BACKENDS.items():

        def sdpa(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv < hq)

        try:
            results[name] = timed(sdpa, grad)
        except RuntimeError as exc:  # backend not available for this shape or GPU
            results[name] = str(exc).splitlines()[0][:160]
    seg = packing.find_segments(torch.arange(s, device=dev).repeat(b, 1), b, s)
    flat = [x.transpose(1, 2).reshape(b * s, -1, d).detach().requires_grad_() for x in (q, k, v)]
    flat_grad = grad.transpose(1, 2).reshape(b * s, hq, d)

    def varlen() -> torch.Tensor:
        return packing._torch_varlen(*flat, seg, 0.0)  # what packed rows run

    try:
        results["torch_varlen"] = timed(varlen, flat_grad)
    except (RuntimeError, TypeError) as exc:
        results["torch_varlen"] = str(exc).splitlines()[0][:160]
    return {
        "shape": dict(zip(FIELDS, shape, strict=True)),
        "ms_per_call": results,
        "ms_per_step": {k: v * layers for k, v in results.items() if isinstance(v, float)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench"))
    args = parser.parse_args()
    report = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        **{name: measure(shape) for name, shape in SHAPES.items()},
    }
    publish(report, args.out / "attention.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
