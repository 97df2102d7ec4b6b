"""entrypoint/job.sh against recording stand-ins for Pyxis (srun), Apptainer, scontrol, mpirun
and qstat: the exact command lines for the container runtimes (which cannot run here), the
bad-use checks, and the exit-code contract. The real srun/mpirun paths are in test_cluster.py.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.launcher import standins

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "entrypoint" / "job.sh"
IN_IMAGE = "/opt/llmtrain/entrypoint/launch.sh"
HEAD = "10.1.2.3"


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.yaml").write_text("method: {name: lora}\n")
    (tmp_path / "llmtrain.sqsh").write_bytes(b"hsqs")
    (tmp_path / "llmtrain.sif").write_bytes(b"SIF")
    log = standins.install(tmp_path / "bin")
    return {"dir": tmp_path, "log": log, "bin": tmp_path / "bin"}


def run_job(
    site: dict[str, Path], scheduler: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    d = site["dir"]
    if scheduler == "slurm":
        base = {
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "llmtrain",
            "SLURM_JOB_NUM_NODES": "2",
            "SLURM_JOB_NODELIST": "gpu[01-02]",
            "SLURM_SUBMIT_DIR": str(d),
            "STANDIN_HOSTS": "gpu01 gpu02",
        }
    else:
        nodefile = d / "nodefile"
        nodefile.write_text("gpu01\ngpu01\ngpu02\ngpu02\n")  # PBS repeats a host per MPI slot
        base = {
            "PBS_JOBID": "77.pbs1",
            "PBS_JOBNAME": "llmtrain",
            "PBS_O_WORKDIR": str(d),
            "PBS_NODEFILE": str(nodefile),
            "PBS_ENVIRONMENT": "PBS_BATCH",
            "PBS_QUEUE": "rt_HF",
            "STANDIN_WALLTIME": "01:00:00",
        }
    base |= {"LLMTRAIN_HOME": str(REPO), "HEAD_ADDR": HEAD, "HF_HOME": str(d / "hf")}
    return subprocess.run(
        ["bash", str(JOB), scheduler, *args],
        cwd=d,
        env=standins.environment(site["bin"], site["log"], **(base | env)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def argvs(site: dict[str, Path], name: str) -> list[list[str]]:
    return [c["argv"] for c in standins.calls(site["log"]) if c["argv"][0] == name]


def test_pyxis_command_lines(site: dict[str, Path]) -> None:
    """Stand-in for Pyxis: srun's container flags are recorded, not run."""
    d = site["dir"]
    res = run_job(
        site,
        "slurm",
        "configs/run.yaml",
        "training.max_steps=5",
        IMAGE=str(d / "llmtrain.sqsh"),
        STANDIN_PYXIS="1",
    )
    assert res.returncode == 0, res.stderr
    run, cfg = d / "runs" / "llmtrain-4242", d / "configs" / "run.yaml"
    container = [
        f"--container-image={d}/llmtrain.sqsh",
        f"--container-mounts={run}:{run},{d}/hf:{d}/hf,{d}/configs:{d}/configs",
        "--no-container-mount-home",
        "--container-env=MASTER_ADDR,MASTER_PORT,NNODES,LAUNCHER,HF_HOME,RUN_DIR,LLMTRAIN_STOP_FILE",
    ]
    tail = [str(cfg), "training.max_steps=5", f"output.dir={run}"]
    assert argvs(site, "srun") == [
        ["srun", "--help"],
        [
            "srun",
            "--nodes=1",
            "--ntasks=1",
            "--kill-on-bad-exit=1",
            *container,
            "python3",
            "-m",
            "llmtrain.cli",
            "validate",
            *tail,
        ],
        [
            "srun",
            "--nodes=2",
            "--ntasks=2",
            "--ntasks-per-node=1",
            "--kill-on-bad-exit=1",
            *container,
            IN_IMAGE,
            *tail,
        ],
    ]
    env = standins.calls(site["log"])[-1]["env"]
    assert env["MASTER_ADDR"] == HEAD
    assert env["MASTER_PORT"] == str(20000 + 4242)
    assert env["NNODES"] == "2"
    assert env["LLMTRAIN_STOP_FILE"] == f"{run}/STOP"


def test_apptainer_under_slurm_command_line(site: dict[str, Path]) -> None:
    """Stand-in for Apptainer: the exact `apptainer exec` line srun would start on each node."""
    d = site["dir"]
    res = run_job(
        site,
        "slurm",
        "configs/run.yaml",
        IMAGE=str(d / "llmtrain.sif"),
        MOUNTS="/data/corpus,/models:/models:ro",
        NPROC_PER_NODE="4",
        SLURM_CPUS_PER_TASK="32",
    )
    assert res.returncode == 0, res.stderr
    run, cfg = d / "runs" / "llmtrain-4242", d / "configs" / "run.yaml"
    apptainer = [
        "apptainer",
        "exec",
        "--nv",
        "--bind",
        f"{run}:{run},{d}/hf:{d}/hf,{d}/configs:{d}/configs,/data/corpus:/data/corpus,/models:/models:ro",
        "--env",
        "PYTHONNOUSERSITE=1",
        "--env",
        f"MASTER_ADDR={HEAD}",
        "--env",
        "MASTER_PORT=24242",
        "--env",
        "NNODES=2",
        "--env",
        "LAUNCHER=torchrun",
        "--env",
        f"HF_HOME={d}/hf",
        "--env",
        f"RUN_DIR={run}",
        "--env",
        f"LLMTRAIN_STOP_FILE={run}/STOP",
        "--env",
        "NPROC_PER_NODE=4",
        f"{d}/llmtrain.sif",
    ]
    assert argvs(site, "srun")[-1] == [
        "srun",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=32",
        *apptainer,
        IN_IMAGE,
        str(cfg),
        f"output.dir={run}",
    ]


def test_pbs_apptainer_mpirun_command_line_and_deadline(site: dict[str, Path]) -> None:
    """Stand-ins for PBS's qstat, Apptainer and mpirun (the real mpirun runs in test_cluster)."""
    d = site["dir"]
    before = int(time.time())
    res = run_job(
        site,
        "pbs",
        IMAGE=str(d / "llmtrain.sif"),
        CONFIG="configs/run.yaml",
        OVERRIDES="training.max_steps=5 lora.r=8",
    )
    assert res.returncode == 0, res.stderr
    run, cfg = d / "runs" / "llmtrain-77", d / "configs" / "run.yaml"
    (validate,) = argvs(site, "apptainer")
    assert validate[-8:] == [
        "python3",
        "-m",
        "llmtrain.cli",
        "validate",
        str(cfg),
        "training.max_steps=5",
        "lora.r=8",
        f"output.dir={run}",
    ]
    (mpirun,) = argvs(site, "mpirun")
    names = [
        "MASTER_ADDR",
        "MASTER_PORT",
        "NNODES",
        "LAUNCHER",
        "HF_HOME",
        "RUN_DIR",
        "LLMTRAIN_STOP_FILE",
        "LLMTRAIN_DEADLINE",
    ]
    exports = [w for n in names for w in ("-x", n)]
    assert mpirun[: 10 + len(exports)] == [
        "mpirun",
        "-np",
        "2",
        "--host",
        "gpu01,gpu02",
        "--map-by",
        "ppr:1:node",
        "--bind-to",
        "none",
        *exports,
        "apptainer",
    ]
    assert mpirun[-5:] == [
        IN_IMAGE,
        str(cfg),
        "training.max_steps=5",
        "lora.r=8",
        f"output.dir={run}",
    ]
    assert "--nv" in mpirun and "PYTHONNOUSERSITE=1" in mpirun
    deadline = int(standins.calls(site["log"])[-1]["env"]["LLMTRAIN_DEADLINE"])
    assert before + 3600 <= deadline <= int(time.time()) + 3600
    assert ["qstat", "-f", "77.pbs1"] in argvs(site, "qstat")


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({}, ["configs/run.yaml"], "IMAGE is not set"),
        ({"IMAGE": "llmtrain.sqsh"}, ["configs/run.yaml"], "IMAGE=llmtrain.sqsh is relative"),
        ({"RUNTIME": "pyxis", "IMAGE": "images/x.sqsh"}, ["configs/run.yaml"], "is relative"),
        (
            {"RUNTIME": "docker", "IMAGE": "/x.sqsh"},
            ["configs/run.yaml"],
            "RUNTIME=docker is unknown",
        ),
        ({"RUNTIME": "none"}, ["configs/absent.yaml"], "configs/absent.yaml does not exist"),
        (
            {"RUNTIME": "none", "LAUNCHER": "deepspeed"},
            ["configs/run.yaml"],
            "LAUNCHER=deepspeed is unknown",
        ),
        ({"RUNTIME": "none"}, ["configs/run.yaml", "max_steps"], "'max_steps' is not a key=value"),
        (
            {"RUNTIME": "none", "VENV": "/nonexistent"},
            ["configs/run.yaml"],
            "needs a virtual environment",
        ),
        ({"RUNTIME": "none", "HEAD_ADDR": ""}, ["configs/run.yaml"], "loopback address 127."),
        (
            {"RUNTIME": "none", "MOUNTS": "/ok,data"},
            ["configs/run.yaml"],
            "MOUNTS entry 'data' is relative",
        ),
    ],
)
def test_bad_use_fails_before_srun(
    site: dict[str, Path], env: dict[str, str], args: list[str], message: str
) -> None:
    if env.get("HEAD_ADDR") == "":
        env = env | {"STANDIN_HOSTS": "localhost"}  # resolves to 127.0.0.1 everywhere
    res = run_job(site, "slurm", *args, **env)
    assert res.returncode == 64, res.stderr
    assert message in res.stderr
    assert argvs(site, "srun") in ([], [["srun", "--help"]])  # nothing was started


def test_usage_line_on_bad_arguments(site: dict[str, Path]) -> None:
    res = run_job(site, "lsf")
    assert res.returncode == 64
    assert res.stderr.startswith("usage: job.sh slurm|pbs")


@pytest.mark.parametrize(
    ("step_rc", "restarts", "requeued"),
    [
        (0, "0", False),
        (64, "0", False),
        (65, "0", False),
        (75, "9", True),
        (1, "0", True),
        (1, "3", False),
    ],
)
def test_exit_code_contract(
    site: dict[str, Path], step_rc: int, restarts: str, requeued: bool
) -> None:
    res = run_job(
        site,
        "slurm",
        "configs/run.yaml",
        RUNTIME="none",
        VENV=str(REPO / ".venv"),
        STANDIN_STEP_RC=str(step_rc),
        SLURM_RESTART_COUNT=restarts,
        MAX_RESTARTS="3",
    )
    assert res.returncode == step_rc, res.stderr
    assert (["scontrol", "requeue", "4242"] in argvs(site, "scontrol")) == requeued


def pbs_port(site: dict[str, Path], job_id: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_job(
        site, "pbs", IMAGE=str(site["dir"] / "llmtrain.sif"), CONFIG="configs/run.yaml",
        PBS_JOBID=job_id, **env,
    )


def recorded_port(site: dict[str, Path]) -> int:
    (mpirun,) = [c for c in standins.calls(site["log"]) if c["argv"][0] == "mpirun"]
    return int(mpirun["env"]["MASTER_PORT"])


@pytest.mark.parametrize(
    ("job_id", "port"),
    [
        ("1234", 21234),
        ("77.pbs1", 20077),
        ("4294967296999", 20000 + 4294967296999 % 20000),
        ("0899", 20899),  # a leading zero is not octal
        ("99999999999999999999999.server", 20000 + 99999999999999999999999 % 20000),
    ],
)
def test_port_of_a_job_number_is_20000_plus_it_mod_20000(
    site: dict[str, Path], job_id: str, port: int
) -> None:
    res = pbs_port(site, job_id)
    assert res.returncode == 0, res.stderr
    assert recorded_port(site) == port
    assert f"({HEAD}:{port})" in res.stderr


@pytest.mark.parametrize(
    "job_id", ["1234[5].server", "1234[6].server", "abc.def", "x", "[]", "12 34", "-5"]
)
def test_port_of_any_other_id_is_in_range_and_stable(site: dict[str, Path], job_id: str) -> None:
    """PBS array elements (1234[5].server) and ids with letters: a port from the id's text."""
    res = pbs_port(site, job_id)
    assert res.returncode == 0, res.stderr
    port = recorded_port(site)
    assert 20000 <= port <= 39999
    site["log"].write_text("")
    assert pbs_port(site, job_id).returncode == 0
    assert recorded_port(site) == port


def test_array_elements_get_different_ports(site: dict[str, Path]) -> None:
    ports = set()
    for job_id in ("1234[5].server", "1234[6].server", "1234[7].server"):
        site["log"].write_text("")
        assert pbs_port(site, job_id).returncode == 0
        ports.add(recorded_port(site))
    assert len(ports) == 3


@pytest.mark.parametrize("value", ["abc", "70000", "0", "-1", "2e4"])
def test_a_bad_master_port_is_refused_naming_it(site: dict[str, Path], value: str) -> None:
    res = pbs_port(site, "1234[5].server", MASTER_PORT=value)
    assert res.returncode == 64, res.stderr
    assert f"MASTER_PORT={value} is not a port number" in res.stderr
    assert argvs(site, "mpirun") == []


def test_a_set_master_port_is_kept(site: dict[str, Path]) -> None:
    res = pbs_port(site, "1234[5].server", MASTER_PORT="29500")
    assert res.returncode == 0, res.stderr
    assert recorded_port(site) == 29500
