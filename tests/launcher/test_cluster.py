"""The launchers on a real multi-node Slurm 22.05 cluster (network namespaces, interface eno1,
one slurmd and one sshd per node): sbatch on the repo's own slurm/ scripts with RUNTIME=none
on CPU, and the PBS path through real OpenMPI mpirun over ssh. No GPUs here, so the command
line overrides the scripts' --gpus-per-node, and the launcher falls back to gloo.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from tests.launcher.cluster import REPO, Cluster

pytestmark = pytest.mark.cluster

ALLREDUCE = "tests/launcher/allreduce.py"
NO_GPUS = ("--gpus-per-node=0",)
# Not anchored at line starts: lines of processes sharing one log may run into each other.
LAUNCH_LINE = re.compile(
    r"launch: node_rank=(\d+) nnodes=(\d+) host=(\S+) addr=(\S+) iface=(\S+) nproc=(\d+)"
)
RANK_LINE = re.compile(
    r"allreduce: rank=(\d+) world=(\d+) host=(\S+) sum=(\S+) expected=(\S+) restart=(\d+)"
)


def job_env(run_dir: Path, **extra: str) -> dict[str, str]:
    return {
        "RUNTIME": "none",
        "RUN_DIR": str(run_dir),
        "HF_HOME": str(run_dir.parent / "hf"),
        **extra,
    }


def check_one_world(output: str, nodes: int, nproc: int, restart: int = 0) -> None:
    """Every node started once with its own rank and found eno1; every rank saw one world."""
    launches = LAUNCH_LINE.findall(output)
    assert sorted(int(r) for r, *_ in launches) == list(range(nodes)), output
    for rank, nnodes, host, _addr, iface, procs in launches:
        assert (int(nnodes), iface, int(procs)) == (nodes, "eno1", nproc)
        assert host == f"node{int(rank) + 1}"  # rank 0 is the first host, and so on
    world = nodes * nproc
    ranks = [m for m in RANK_LINE.findall(output) if int(m[5]) == restart]
    assert sorted(int(m[0]) for m in ranks) == list(range(world)), output
    assert all(int(m[1]) == world and m[3] == m[4] for m in ranks)
    assert {m[2] for m in ranks} == {f"node{i + 1}" for i in range(nodes)}


def test_allreduce_world_across_nodes(cluster: Cluster, tmp_path: Path) -> None:
    run = tmp_path / "run"
    job_id = cluster.sbatch(
        "slurm/train_8x8.sbatch",
        "configs/lora.yaml",
        env=job_env(run, NPROC_PER_NODE="2", TRAIN_SCRIPT=ALLREDUCE),
        options=(*NO_GPUS, f"--output={tmp_path}/%j.out"),
    )
    job = cluster.wait(job_id, timeout=240)
    output = (tmp_path / f"{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), output
    check_one_world(output, cluster.nodes, nproc=2)
    assert (
        run / "result.txt"
    ).read_text() == f"world={2 * cluster.nodes} sum={sum(range(2 * cluster.nodes))}\n"


def test_head_resolving_to_loopback_fails_fast(cluster: Cluster, tmp_path: Path) -> None:
    """Debian's /etc/hosts maps a host's own name to 127.0.1.1: refused before any step."""
    original = (cluster.dir / "hosts.node1").read_text()
    cluster.set_hosts("node1", "127.0.0.1\tlocalhost\n127.0.1.1\tnode1\n")
    try:
        started = time.monotonic()
        job_id = cluster.sbatch(
            "slurm/train_8x8.sbatch",
            env=job_env(tmp_path / "run"),
            options=(*NO_GPUS, f"--output={tmp_path}/%j.out"),
        )
        job = cluster.wait(job_id, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        cluster.set_hosts("node1", original)
    output = (tmp_path / f"{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "64:0", "0"), output
    assert "head node node1 resolves to the loopback address 127.0.1.1" in output
    assert "HEAD_IFACE=" in output
    assert cluster.created_steps(job_id) == []
    assert elapsed < 30


def test_missing_image_fails_before_srun(cluster: Cluster, tmp_path: Path) -> None:
    env = job_env(tmp_path / "run")
    del env["RUNTIME"]
    job_id = cluster.sbatch(
        "slurm/train_1x8.sbatch",
        env=env | {"IMAGE": ""},
        options=(*NO_GPUS, f"--output={tmp_path}/%j.out"),
    )
    job = cluster.wait(job_id, timeout=60)
    output = (tmp_path / f"{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "64:0", "0"), output
    assert "IMAGE is not set" in output
    assert cluster.created_steps(job_id) == []


@pytest.mark.parametrize("cluster", [2], indirect=True, ids=["2nodes"])
def test_wall_time_warning_stops_and_requeues(cluster: Cluster, tmp_path: Path) -> None:
    """USR1 to the batch shell (as --signal=B:USR1@600 sends it) -> STOP file -> exit 75 ->
    requeue -> the second run starts without the STOP file and finishes."""
    run = tmp_path / "run"
    job_id = cluster.sbatch(
        "slurm/train_8x8.sbatch",
        "configs/lora.yaml",
        "hold=300",
        env=job_env(run, NPROC_PER_NODE="1", TRAIN_SCRIPT=ALLREDUCE),
        options=(*NO_GPUS, f"--output={tmp_path}/%j.out"),
    )
    out = tmp_path / f"{job_id}.out"
    deadline = time.monotonic() + 120
    while len(RANK_LINE.findall(out.read_text() if out.exists() else "")) < cluster.nodes:
        assert time.monotonic() < deadline, "ranks never started"
        time.sleep(1)
    cluster.slurm("scancel", "--batch", "--signal=USR1", str(job_id))
    job = cluster.wait(job_id, timeout=300, states={"COMPLETED", "FAILED", "CANCELLED"})
    output = out.read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), output
    assert "wall-time warning" in output and "exit 75: stopped on purpose; requeueing" in output
    assert output.count("saw ") == cluster.nodes  # every rank saw the STOP file
    # Rank 0 lingers, so srun kills it and itself reports 143: the first failure counts.
    assert "step exit 143; the first node to fail exited 75" in output
    # With --open-mode=append the log holds both attempts: check the last one.
    check_one_world(output[output.rfind("job.sh: job ") :], cluster.nodes, nproc=1, restart=1)
    assert not (run / "STOP").exists()
    assert (run / "result.txt").read_text().count("\n") == 1


@pytest.mark.parametrize("cluster", [2], indirect=True, ids=["2nodes"])
def test_failures_requeue_up_to_the_limit(cluster: Cluster, tmp_path: Path) -> None:
    job_id = cluster.sbatch(
        "slurm/train_1x8.sbatch",
        "configs/lora.yaml",
        "exit=3",
        env=job_env(tmp_path / "run", NPROC_PER_NODE="1", TRAIN_SCRIPT=ALLREDUCE, MAX_RESTARTS="1"),
        options=(*NO_GPUS, f"--output={tmp_path}/%j.out"),
    )
    job = cluster.wait(job_id, timeout=300, states={"FAILED", "COMPLETED", "CANCELLED"})
    output = (tmp_path / f"{job_id}.out").read_text()
    # exit 3 comes through torchrun (which itself would say 1) to the contract.
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "3:0", "1"), (
        job,
        output,
    )
    assert "exit 3: failed; requeueing (restart 1 of 1)" in output
    assert "exit 3: failed; not requeued" in output


@pytest.mark.parametrize("cluster", [2], indirect=True, ids=["2nodes"])
def test_finetune_tiny_model(cluster: Cluster, tmp_path: Path) -> None:
    """The real `llmtrain validate` + `llmtrain finetune` on the embedded tiny Llama, 2 nodes."""
    run = tmp_path / "run"
    job_id = cluster.sbatch(
        "slurm/train_8x8.sbatch",
        "configs/demo.yaml",
        "training.num_train_epochs=4",
        "training.logging_steps=2",
        "generation.samples=0",
        "output.merge=false",
        env=job_env(run, NPROC_PER_NODE="1", PREFLIGHT="1"),
        options=(*NO_GPUS, f"--output={tmp_path}/%j.out"),
    )
    job = cluster.wait(job_id, timeout=420)
    output = (tmp_path / f"{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "0"), output
    assert output.count("is valid") == 1  # validated once, before the training step
    # PREFLIGHT=1: the doctor ran on every node, through the same launcher, before training.
    assert "llmtrain doctor: 2 rank(s) on 2 node(s)" in output, output
    assert "verdict: ready" in output
    launches = LAUNCH_LINE.findall(output)
    assert sorted(r for r, *_ in launches) == ["0", "1"] and {i for *_, i, _ in launches} == {
        "eno1"
    }
    assert json.loads((run / "manifest.json").read_text())["world_size"] == cluster.nodes
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps))  # one writer, not one per rank
    assert len(list(run.rglob("adapter_model.safetensors"))) == 1


@pytest.mark.parametrize("cluster", [2, 3], indirect=True, ids=["2nodes", "3nodes"])
def test_pbs_mpirun_over_ssh(cluster: Cluster, tmp_path: Path) -> None:
    """pbs/train_2x8.pbs run as PBS would: the job shell on the first node of PBS_NODEFILE,
    PBS variables set as PBS sets them, real OpenMPI mpirun starting launch.sh over ssh."""
    nodes = [f"node{i + 1}" for i in range(cluster.nodes)]
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("".join(f"{n}\n{n}\n" for n in nodes))  # one line per MPI slot
    run = tmp_path / "run"
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PBS_JOBID": "31.pbs1",
        "PBS_JOBNAME": "llmtrain",
        "PBS_O_WORKDIR": str(REPO),
        "PBS_NODEFILE": str(nodefile),
        "PBS_ENVIRONMENT": "PBS_BATCH",
        "PBS_QUEUE": "workq",
        "PBS_O_HOST": "login1",
        "WALLTIME": "00:30:00",
        "CONFIG": "configs/lora.yaml",
        "OVERRIDES": "hold=0",
        **job_env(run, NPROC_PER_NODE="2", TRAIN_SCRIPT=ALLREDUCE),
        # The test cluster's ssh (a real PBS site has its own), and mpirun as root.
        "OMPI_MCA_plm_rsh_agent": f"ssh -F {cluster.dir}/ssh/config",
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    }
    started = int(time.time())
    res = cluster.in_node("node1", ["bash", str(REPO / "pbs" / "train_2x8.pbs")], env, timeout=240)
    output = res.stdout + res.stderr
    assert res.returncode == 0, output
    check_one_world(output, cluster.nodes, nproc=2)
    assert (
        run / "result.txt"
    ).read_text() == f"world={2 * cluster.nodes} sum={sum(range(2 * cluster.nodes))}\n"
    deadline = int(re.search(r"deadline=(\d+)", output).group(1))  # type: ignore[union-attr]
    assert started + 1800 <= deadline <= int(time.time()) + 1800


@pytest.mark.parametrize("cluster", [2], indirect=True, ids=["2nodes"])
def test_real_training_stops_on_the_warning_requeues_and_resumes(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The whole preemption loop with the real `llmtrain finetune` on 2 nodes: the wall-time
    warning (USR1 to the batch shell, as --signal=B:USR1@N sends it) -> STOP file -> every rank
    checkpoints and exits 75 -> job.sh requeues -> the second attempt resumes from the
    checkpoint and ends at exactly the target number of optimizer steps."""
    run = tmp_path / "run"
    steps = 200
    job_id = cluster.sbatch(
        "slurm/train_8x8.sbatch",
        "configs/demo.yaml",
        f"training.max_steps={steps}",
        "training.save_steps=20",
        "training.logging_steps=5",
        "generation.samples=0",
        "output.merge=false",
        env=job_env(run, NPROC_PER_NODE="1"),
        options=(*NO_GPUS, f"--output={tmp_path}/%j.out"),
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and '"step": 30' in metrics.read_text()):
        assert time.monotonic() < deadline, "training never reached step 30"
        time.sleep(0.5)
    cluster.slurm("scancel", "--batch", "--signal=USR1", str(job_id))
    job = cluster.wait(job_id, timeout=600, states={"COMPLETED", "FAILED", "CANCELLED"})
    output = (tmp_path / f"{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), output
    assert "exit 75: stopped on purpose; requeueing" in output
    assert "resuming from" in output
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    logged = [r["step"] for r in records if "loss" in r]
    assert logged == list(range(5, steps + 1, 5))  # none skipped, none twice
    state = json.loads((run / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    assert (run / "final" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("cluster", [2], indirect=True, ids=["2nodes"])
def test_bad_config_exits_64_and_is_not_requeued(cluster: Cluster, tmp_path: Path) -> None:
    job_id = cluster.sbatch(
        "slurm/train_8x8.sbatch",
        "configs/lora.yaml",
        "training.learnin_rate=1e-4",
        env=job_env(tmp_path / "run", NPROC_PER_NODE="1"),
        options=(*NO_GPUS, f"--output={tmp_path}/%j.out"),
    )
    job = cluster.wait(job_id, timeout=120, states={"COMPLETED", "FAILED", "CANCELLED"})
    output = (tmp_path / f"{job_id}.out").read_text()
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "64:0", "0"), output
    assert "training.learnin_rate: unknown key" in output
    assert cluster.created_steps(job_id) == []
