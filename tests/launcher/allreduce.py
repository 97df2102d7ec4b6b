"""Launcher smoke test: every rank joins one world and all-reduces its rank (gloo or NCCL).

Run by entrypoint/launch.sh as TRAIN_SCRIPT, with the launcher's arguments: CONFIG followed by
key=value overrides. Understood keys: output.dir (rank 0 appends one line to result.txt there),
hold=SECONDS (first attempt only: wait that long for LLMTRAIN_STOP_FILE, exit 75 when it
appears, rank 0 last), exit=CODE (exit with CODE after the all-reduce).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_STOPPED = 75


def overrides(argv: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in argv[1:] if "=" in arg)


def say(line: str) -> None:
    """One write per line: workers run unbuffered (python -u) and share the job's log."""
    os.write(1, f"{line}\n".encode())


def main() -> int:
    opts = overrides(sys.argv[1:])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank)])
    dist.all_reduce(total)
    expected = world * (world - 1) / 2
    say(
        f"allreduce: rank={rank} world={world} host={socket.gethostname()} "
        f"sum={total.item():g} expected={expected:g} "
        f"restart={os.environ.get('SLURM_RESTART_COUNT', '0')} "
        f"deadline={os.environ.get('LLMTRAIN_DEADLINE', '')}"
    )
    if total.item() != expected:
        return 1
    first_attempt = os.environ.get("SLURM_RESTART_COUNT", "0") == "0"
    stop_file = Path(os.environ["LLMTRAIN_STOP_FILE"])
    deadline = time.monotonic() + float(opts.get("hold", "0")) if first_attempt else 0.0
    while time.monotonic() < deadline and not stop_file.exists():
        time.sleep(0.5)
    # Ranks must agree, or some would exit 75 and the others wait on them.
    stopped = torch.tensor([float(stop_file.exists())])
    dist.all_reduce(stopped, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    if stopped.item():
        say(f"allreduce: rank={rank} saw {stop_file}; stopping for a requeue")
        if rank == 0 and world > 1:
            # Let the other nodes exit first, so srun --kill-on-bad-exit kills this one (exit
            # 143): the launchers must still report the 75 that came first.
            time.sleep(10)
        return EXIT_STOPPED
    if rank == 0 and "output.dir" in opts:
        out = Path(opts["output.dir"])
        with (out / "result.txt").open("a") as f:
            f.write(f"world={world} sum={total.item():g}\n")
    return int(opts.get("exit", "0"))


if __name__ == "__main__":
    sys.exit(main())
