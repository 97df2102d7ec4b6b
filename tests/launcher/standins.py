"""Recording stand-ins for what cannot run on a CPU test machine: Pyxis (srun's --container-*
flags), Apptainer, a PBS server (qstat), and scontrol without a cluster. Each records its
command line as one JSON list per call, so tests assert exact command lines. The real
srun, mpirun and torchrun paths run in test_cluster.py.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

# One program for every stand-in; it looks at the name it was called by.
_PROGRAM = """\
import json, os, sys, time
from pathlib import Path
name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
env = {k: os.environ[k] for k in os.environ["STANDIN_ENV"].split() if k in os.environ}
with open(os.environ["STANDIN_LOG"], "a") as log:
    log.write(json.dumps({"argv": [name, *args], "env": env}) + "\\n")
if name == "srun" and args == ["--help"] and os.environ.get("STANDIN_PYXIS"):
    print("      --container-image=[USER@][REGISTRY#]IMAGE[:TAG]|PATH")
elif name == "scontrol" and args[:2] == ["show", "hostnames"]:
    print("\\n".join(os.environ["STANDIN_HOSTS"].split()))
elif name == "qstat":
    print(f"Job Id: {args[-1]}\\n    Resource_List.walltime = {os.environ['STANDIN_WALLTIME']}")
elif name in ("srun", "mpirun", "apptainer", "python3"):
    is_validate = "validate" in args
    sys.exit(0 if is_validate else int(os.environ.get("STANDIN_STEP_RC", "0")))
"""

NAMES = ("srun", "scontrol", "apptainer", "mpirun", "qstat")
# Variables the launcher must hand to the tasks; the stand-ins record their values.
RECORDED_ENV = (
    "MASTER_ADDR MASTER_PORT NNODES LAUNCHER RUN_DIR LLMTRAIN_STOP_FILE LLMTRAIN_DEADLINE "
    "HF_HOME PATH VIRTUAL_ENV"
)


def install(bin_dir: Path) -> Path:
    """Write the stand-ins into bin_dir; return the log they append to."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        path = bin_dir / name
        path.write_text(
            f"#!{sys.executable}\n# stand-in for {name}: records its command line\n{_PROGRAM}"
        )
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = bin_dir / "calls.jsonl"
    log.touch()
    return log


def calls(log: Path) -> list[dict]:
    """Each call as {"argv": [name, *args], "env": {NAME: value}} for the names in RECORDED_ENV."""
    return [json.loads(line) for line in log.read_text().splitlines()]


def environment(bin_dir: Path, log: Path, **extra: str) -> dict[str, str]:
    """A clean environment with the stand-ins first on PATH."""
    keep = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "TMPDIR")}
    path = f"{bin_dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return {**keep, "PATH": path, "STANDIN_LOG": str(log), "STANDIN_ENV": RECORDED_ENV, **extra}
