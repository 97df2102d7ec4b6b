"""How long `llmtrain VERB --help` takes, per verb (median of 5 runs, seconds, wall clock).

    python -m bench.cli_startup

The bar (issue: CLI start-up) is under 1 s on a laptop-class CPU: a verb's module must not import
torch, transformers or datasets before its verb runs (tests/unit/test_layout.py checks that;
this script measures it)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from llmtrain.cli import VERBS

RUNS = 5


def seconds(argv: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llmtrain.cli", *argv], check=True,
                       stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(f"{'command':<32} median s")
    for argv in (["--help"], ["--version"], *([verb, "--help"] for verb in VERBS)):
        print(f"{'llmtrain ' + ' '.join(argv):<32} {seconds(argv):.3f}")


if __name__ == "__main__":
    main()
