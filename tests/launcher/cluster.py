"""Drive the real Slurm cluster of tests/cluster/up.sh: submit, wait, read job records."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tests" / "cluster"
TOOLS = ("slurmctld", "slurmd", "munged", "sshd", "mpirun", "nsenter", "unshare", "ip")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


def missing_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurmd, sshd)"
    absent = [t for t in TOOLS if shutil.which(t) is None]
    if absent:
        packages = "slurm-wlm munge openmpi-bin openssh-server iproute2"
        return f"missing {', '.join(absent)}: apt-get install {packages}"
    return None


@dataclass
class Cluster:
    nodes: int
    dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.dir / "slurm.conf")}

    def slurm(self, *args: str) -> str:
        return subprocess.run(args, env=self.env, check=True, capture_output=True, text=True).stdout

    def sbatch(
        self, script: str, *args: str, env: dict[str, str], options: tuple[str, ...] = ()
    ) -> int:
        """Submit one of the repo's job scripts from the repo root, as a user would."""
        out = subprocess.run(
            ["sbatch", "--parsable", f"--nodes={self.nodes}", *options, script, *args],
            cwd=REPO,
            env=self.env | env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        record = self.slurm("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", record))

    def wait(self, job_id: int, timeout: float, states: set[str] = FINAL) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            if time.monotonic() > deadline:
                subprocess.run(["scancel", str(job_id)], env=self.env, check=False)
                raise TimeoutError(f"job {job_id} still {job['JobState']} after {timeout:.0f}s")
            time.sleep(1)

    def created_steps(self, job_id: int) -> list[str]:
        """Steps slurmctld created for the job, from its log (no accounting here)."""
        log = (self.dir / "log" / "slurmctld.log").read_text()
        return re.findall(rf"StepId={job_id}\.(\d+)", log)

    def set_hosts(self, member: str, text: str) -> None:
        """Rewrite a member's /etc/hosts in place (the bind mount pins the inode)."""
        with (self.dir / f"hosts.{member}").open("r+") as f:
            f.seek(0)
            f.write(text)
            f.truncate()

    def in_node(
        self, node: str, argv: list[str], env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run a command on a node (its network, hostname and /etc/hosts), like a PBS job shell."""
        holder = (self.dir / f"holder.{node}.pid").read_text().strip()
        return subprocess.run(
            ["nsenter", f"--target={holder}", "--net", "--uts", "--mount", "--", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


# A fixed place (the scripts' default), so a run after a crash finds and removes stale state.
CLUSTER_DIR = Path(
    os.environ.get("LLMTRAIN_CLUSTER_DIR") or Path(tempfile.gettempdir()) / "llmtrain-cluster"
)


def up(nodes: int) -> Cluster:
    env = {**os.environ, "LLMTRAIN_CLUSTER_DIR": str(CLUSTER_DIR)}
    subprocess.run([str(SCRIPTS / "up.sh"), str(nodes)], env=env, check=True, timeout=180)
    return Cluster(nodes, CLUSTER_DIR)


def down() -> None:
    env = {**os.environ, "LLMTRAIN_CLUSTER_DIR": str(CLUSTER_DIR)}
    subprocess.run([str(SCRIPTS / "down.sh")], env=env, check=True, timeout=120)
