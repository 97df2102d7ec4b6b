"""Throughput, MFU and the comparison; refuses runs that did not see the same data and batch.

MFU = model FLOPs / time / 989 TFLOP/s (H100/H200 SXM dense bf16), with model FLOPs
= 6 x parameters x real tokens + 6 x layers x hidden x (sum over samples of length^2),
the second term being causal attention (QK^T and AV, forward and backward, half of the square).
Padding is not counted: it is work, but not useful work. LoRA is counted with the same formula
(its backward skips most weight gradients), so its MFU reads as that of a full fine-tune.
"""

from __future__ import annotations

from typing import Any

from bench.probe import RunResult

PEAK_FLOPS = 989e12
MFU_FORMULA = (
    "(6 * parameters * real_tokens + 6 * layers * hidden * sum(sample_length^2)) / seconds / 989e12"
)


class NotComparable(Exception):
    """Two runs did not see the same samples in the same steps."""


def check_comparable(base: RunResult, other: RunResult) -> None:
    problems = []
    if base.timed_steps != other.timed_steps or not base.timed_steps:
        problems.append(f"timed steps {base.timed_steps} vs {other.timed_steps}")
    if base.samples_per_step != other.samples_per_step:
        problems.append(f"samples per step {base.samples_per_step} vs {other.samples_per_step}")
    if base.checksums != other.checksums:
        problems.append("the samples of some steps differ (content checksums)")
    if (base.real_tokens, base.loss_tokens) != (other.real_tokens, other.loss_tokens):
        problems.append(
            f"real/loss tokens {base.real_tokens}/{base.loss_tokens} vs "
            f"{other.real_tokens}/{other.loss_tokens}"
        )
    if problems:
        raise NotComparable(f"{other.name} vs {base.name}: " + "; ".join(problems))


def metrics(r: RunResult, shape: dict[str, int]) -> dict[str, Any]:
    flops = 6 * shape["parameters"] * r.real_tokens
    flops += 6 * shape["layers"] * shape["hidden"] * r.sum_sq_lengths
    return {
        "tokens_per_s": r.tokens / r.seconds,
        "real_tokens_per_s": r.real_tokens / r.seconds,
        "effective_tokens_per_s": r.loss_tokens / r.seconds,
        "padding_share": 1 - r.real_tokens / r.tokens,
        "step_ms": 1000 * r.seconds / r.timed_steps,
        "mfu": flops / r.seconds / PEAK_FLOPS,
        "peak_gib": r.peak_bytes / 2**30 if r.peak_bytes is not None else None,
        "first_loss": r.losses[0],
    }


def compare(base: RunResult, other: RunResult, shape: dict[str, int]) -> dict[str, Any]:
    """Metrics of `other` with its ratios to the baseline; raises NotComparable."""
    check_comparable(base, other)
    b, o = metrics(base, shape), metrics(other, shape)
    steps = min(len(base.losses), len(other.losses))
    return {
        **o,
        "tokens_ratio": o["tokens_per_s"] / b["tokens_per_s"],
        "effective_ratio": o["effective_tokens_per_s"] / b["effective_tokens_per_s"],
        "memory_ratio": (
            o["peak_gib"] / b["peak_gib"] if o["peak_gib"] and b["peak_gib"] else None
        ),
        "first_loss_rel_diff": abs(o["first_loss"] - b["first_loss"]) / abs(b["first_loss"]),
        "max_loss_rel_diff": max(
            abs(x - y) / abs(y)
            for x, y in zip(other.losses[:steps], base.losses[:steps], strict=True)
        ),
    }


def add_peer_ratios(rows: list[dict[str, Any]]) -> None:
    """Gives every measured row but the baseline its ratios to the best peer run of its
    workload (highest effective tokens/s): peer_tokens_ratio, peer_effective_ratio,
    peer_memory_ratio, and peer_best, its name. Leaves rows as they are without a peer run."""
    peers = [r for r in rows if r["run"].startswith("peer") and "error" not in r]
    if not peers:
        return
    best = max(peers, key=lambda r: r["effective_tokens_per_s"])
    for r in rows:
        if r["run"] == "baseline" or "error" in r:
            continue
        r["peer_best"] = best["run"]
        r["peer_tokens_ratio"] = r["tokens_per_s"] / best["tokens_per_s"]
        r["peer_effective_ratio"] = r["effective_tokens_per_s"] / best["effective_tokens_per_s"]
        r["peer_memory_ratio"] = (
            r["peak_gib"] / best["peak_gib"] if r["peak_gib"] and best["peak_gib"] else None
        )


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """One markdown row per run: workload, run, the measured numbers, `llmtrain estimate`'s
    allocated peak beside the measured one (llmtrain's runs), the ratios to the baseline and to
    the best peer run (add_peer_ratios)."""
    head = (
        "| workload | run | tokens/s | effective tokens/s | padding | step ms | MFU | peak GiB "
        "| predicted GiB | x baseline tokens/s | x baseline effective | x peer tokens/s "
        "| x peer effective | first-step loss (rel. diff) |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['run']} | {r['tokens_per_s']:,.0f} "
            f"| {r['effective_tokens_per_s']:,.0f} | {r['padding_share']:.0%} "
            f"| {r['step_ms']:.0f} | {r['mfu']:.1%} | {_fmt(r['peak_gib'], '.1f')} "
            f"| {_fmt(r.get('predicted_peak_gib'), '.1f')} "
            f"| {_fmt(r.get('tokens_ratio'), '.2f')} | {_fmt(r.get('effective_ratio'), '.2f')} "
            f"| {_fmt(r.get('peer_tokens_ratio'), '.2f')} "
            f"| {_fmt(r.get('peer_effective_ratio'), '.2f')} "
            f"| {r['first_loss']:.4f} ({_fmt(r.get('first_loss_rel_diff'), '.1e')}) |"
        )
    return "\n".join(lines)
