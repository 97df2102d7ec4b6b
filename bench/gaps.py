"""Where the GPU waits: the idle gaps of a profiled run, each blamed on what the host was doing.

A kernel timeline says how long the GPU sat idle, not why. This reads a torch.profiler (Kineto)
Chrome trace and, for every gap between the GPU's busy intervals, asks two questions of the host
side of the same trace:

- Did a synchronizing CUDA call (cudaStreamSynchronize, cudaDeviceSynchronize,
  cudaEventSynchronize, a blocking cudaMemcpy) return inside the gap? Then the host had waited
  for the GPU to drain, and the gap is the time it took to queue work again: it is blamed on the
  host op that made that call ("after sync: aten::_local_scalar_dense" for a `.item()`).
- Otherwise the GPU ran out of queued work while the host was still launching: the gap is
  blamed on the innermost host op that launched the kernel that ended it ("launch: aten::mm").

Each blame also carries the outermost host op around it (the phase: a module's forward, an
autograd backward node, Optimizer.step), so that a thin spread of small gaps still adds up to a
place. SyncCensus records the Python stacks of the synchronizing calls themselves, through
torch.cuda.set_sync_debug_mode, which the trace alone (without with_stack) cannot give.

Times are microseconds, as in the trace.
"""

from __future__ import annotations

import bisect
import os
import sys
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

GPU_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
LAUNCH_CATEGORIES = frozenset({"cuda_runtime", "cuda_driver"})
HOST_CATEGORIES = frozenset({"cpu_op", "user_annotation"})


def is_sync_call(name: str) -> bool:
    """A CUDA runtime call that blocks the host until the GPU has done earlier work."""
    return "Synchronize" in name or name == "cudaMemcpy"


@dataclass(frozen=True)
class Span:
    start: float  # us
    end: float  # us
    name: str
    tid: Any
    correlation: Any = None  # links a launch call to the GPU work it queued


def _span(event: dict[str, Any]) -> Span:
    start = float(event["ts"])
    end = start + float(event.get("dur", 0.0))
    correlation = (event.get("args") or {}).get("correlation")
    return Span(start, end, str(event["name"]), event.get("tid"), correlation)


class HostStacks:
    """The host ops open at a moment on one thread: [outermost, ..., innermost].

    Ops on one thread nest, so every op open at t is the last op that began before t or one
    of its ancestors: one sweep finds each op's parent, and a query walks up from there.
    """

    def __init__(self, spans: list[Span]) -> None:
        self.by_tid: dict[Any, tuple[list[float], list[Span], list[int]]] = {}
        for tid in {s.tid for s in spans}:
            mine = sorted((s for s in spans if s.tid == tid), key=lambda s: (s.start, -s.end))
            parent: list[int] = []
            open_ops: list[int] = []
            for i, s in enumerate(mine):
                while open_ops and mine[open_ops[-1]].end <= s.start:
                    open_ops.pop()
                parent.append(open_ops[-1] if open_ops else -1)
                open_ops.append(i)
            self.by_tid[tid] = ([s.start for s in mine], mine, parent)

    def at(self, tid: Any, t: float) -> list[Span]:
        starts, spans, parent = self.by_tid.get(tid, ([], [], []))
        i = bisect.bisect_right(starts, t) - 1
        chain = []
        while i >= 0:
            if spans[i].end >= t:
                chain.append(spans[i])
            i = parent[i]
        return chain[::-1]


def _blame(stack: list[Span]) -> tuple[str, str]:
    if not stack:
        return "(no host op)", "(no host op)"
    return stack[-1].name, stack[0].name


def idle_report(trace: dict[str, Any], steps: int, min_gap_us: float = 2.0, top: int = 15) -> dict:
    """The GPU's idle time in a Chrome trace, and what the host did during it.

    trace: the parsed JSON of `torch.profiler.profile.export_chrome_trace` over `steps`
    optimizer steps. Gaps shorter than min_gap_us count in the idle total but are not blamed
    (the launch latency of back-to-back kernels). Returns microseconds: window (first GPU start
    to last GPU end), busy, idle, idle_per_step, and `by_blame` / `by_phase`: the top causes
    as [name, total us, gaps]. Raises ValueError on a trace with no GPU activity.
    """
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = sorted((_span(e) for e in events if e.get("cat") in GPU_CATEGORIES),
                 key=lambda s: s.start)
    if not gpu:
        raise ValueError("the trace holds no GPU kernels, copies or memsets")
    launches = [_span(e) for e in events if e.get("cat") in LAUNCH_CATEGORIES]
    launch_of = {s.correlation: s for s in launches if s.correlation is not None}
    syncs = sorted((s for s in launches if is_sync_call(s.name)), key=lambda s: s.end)
    sync_ends = [s.end for s in syncs]
    host = HostStacks([_span(e) for e in events if e.get("cat") in HOST_CATEGORIES])

    blame: dict[str, float] = {}
    blame_n: Counter[str] = Counter()
    phase: dict[str, float] = {}
    phase_n: Counter[str] = Counter()
    idle = unblamed = 0.0
    run_end = gpu[0].end
    for nxt in gpu[1:]:
        gap = nxt.start - run_end
        if gap > 0:
            idle += gap
            if gap >= min_gap_us:
                key, outer = _blame_gap(run_end, nxt, launch_of, syncs, sync_ends, host)
                blame[key] = blame.get(key, 0.0) + gap
                blame_n[key] += 1
                phase[outer] = phase.get(outer, 0.0) + gap
                phase_n[outer] += 1
            else:
                unblamed += gap
        run_end = max(run_end, nxt.end)
    window = run_end - gpu[0].start
    busy = window - idle
    return {
        "window_us": window,
        "busy_us": busy,
        "idle_us": idle,
        "idle_share": idle / window if window else 0.0,
        "idle_per_step_us": idle / max(steps, 1),
        "short_gaps_us": unblamed,
        "by_blame": _top(blame, blame_n, top),
        "by_phase": _top(phase, phase_n, top),
    }


def _top(total: dict[str, float], count: Counter[str], top: int) -> list[list[Any]]:
    ranked = sorted(total.items(), key=lambda kv: -kv[1])[:top]
    return [[k, round(v, 1), count[k]] for k, v in ranked]


def _blame_gap(
    gap_start: float,
    nxt: Span,
    launch_of: dict[Any, Span],
    syncs: list[Span],
    sync_ends: list[float],
    host: HostStacks,
) -> tuple[str, str]:
    i = bisect.bisect_left(sync_ends, gap_start)
    if i < len(syncs) and syncs[i].end <= nxt.start:  # the host waited, then queued again
        sync = syncs[i]
        inner, outer = _blame(host.at(sync.tid, (sync.start + sync.end) / 2))
        return f"after sync: {inner}", outer
    launch = launch_of.get(nxt.correlation)
    if launch is None:
        return "launch: (not in trace)", "(no host op)"
    inner, outer = _blame(host.at(launch.tid, (launch.start + launch.end) / 2))
    if launch.start < gap_start:  # queued before the GPU went idle: it waited on something else
        return f"queued early: {inner}", outer
    return f"launch: {inner}", outer


def _module_path(filename: str) -> str:
    """A source file's path from the sys.path entry it was imported through (the package's
    own path, the same on every machine)."""
    roots = [p for p in map(os.path.abspath, sys.path) if p and filename.startswith(p + os.sep)]
    return filename[len(max(roots, key=len)) + 1 :] if roots else os.path.basename(filename)


class SyncCensus:
    """Counts the synchronizing CUDA calls made between start() and stop(), by Python stack.

    Uses torch.cuda.set_sync_debug_mode("warn"), which warns at each such call; the stack of
    each warning (the last `frames` frames outside torch and the standard library) is the key.
    """

    def __init__(self, frames: int = 4) -> None:
        self.frames = frames
        self.counts: Counter[str] = Counter()
        self._catch: Any = None

    def start(self) -> None:
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._record
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> list[list[Any]]:
        torch.cuda.set_sync_debug_mode("default")
        if self._catch is not None:
            self._catch.__exit__(None, None, None)
            self._catch = None
        return [[k, n] for k, n in self.counts.most_common(20)]

    def _record(self, message: Any, category: Any, filename: str, lineno: int,
                file: Any = None, line: Any = None) -> None:
        if "synchroniz" not in str(message):
            return
        frames = [
            f"{_module_path(f.filename)}:{f.lineno} {f.name}"
            for f in traceback.extract_stack()[:-1]
            if "/torch/" not in f.filename and "/warnings.py" not in f.filename
            and not f.filename.endswith("bench/gaps.py")
        ]
        self.counts[" <- ".join(reversed(frames[-self.frames:]))] += 1
