"""Run torchrun or `accelerate launch` and exit with the code of the first worker that failed.

torchrun and accelerate exit 1 for any worker failure, which would hide the exit-code contract
(64 bad config, 65 bad data, 75 stopped on purpose, resume me; errors.py) from job.sh, which
requeues or not by it. entrypoint/launch.sh runs, on each node:

    python3 -m llmtrain.launch torchrun|accelerate LAUNCHER-ARGS... PROGRAM-ARGS...

where the arguments are exactly those of `torchrun ...` or `accelerate launch ...`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence

from llmtrain.errors import EXIT_USAGE

LAUNCHERS = ("torchrun", "accelerate")


def exit_code(returncode: int) -> int:
    """A worker's return code as a shell exit status: a death by signal N (Python's -N)
    becomes 128 + N, as a shell reports it; codes 1-255 pass through."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher named by argv[0] in this process with the rest of argv as its command
    line; the exit status of the first failed worker (0 when all succeeded). Returns 64
    without running anything when the launcher is not torchrun or accelerate."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in LAUNCHERS:
        print(
            f"usage: python3 -m llmtrain.launch {'|'.join(LAUNCHERS)} ARGS... (got {args[:1]})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if args[0] == "torchrun":
        from torch.distributed.run import main as torchrun

        launch: Callable[[], object] = torchrun
    else:
        from accelerate.commands.launch import main as accelerate

        launch = accelerate
    sys.argv = args  # both parse sys.argv[1:]; argv[0] is the program name they print
    try:
        launch()
    except ChildFailedError as err:
        return exit_code(err.get_first_failure()[1].exitcode)
    except subprocess.CalledProcessError as err:  # accelerate's single-process path
        return exit_code(err.returncode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
