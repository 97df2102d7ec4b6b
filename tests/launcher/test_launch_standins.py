"""entrypoint/launch.sh's command lines and refusals, with a recording stand-in for `python3`
(accelerate multi-node needs GPUs, which this machine lacks). Real torchrun runs across
real nodes in test_cluster.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.launcher import standins

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "entrypoint" / "launch.sh"


def run_launch(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    log = standins.install(bin_dir)
    # The stand-in python3 records its command line: `python3 -m llmtrain.launch LAUNCHER ...`.
    (bin_dir / "python3").symlink_to(bin_dir / "srun")
    base = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29555",
        "NNODES": "2",
        "RUN_DIR": str(tmp_path),
    }
    res = subprocess.run(
        ["bash", str(LAUNCH), "/cfg/run.yaml", "lora.r=8"],
        env=standins.environment(bin_dir, log, **(base | env)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = standins.calls(log)
    return res, calls[0]["argv"][3:] if calls else []


def test_torchrun_static_rendezvous(tmp_path: Path) -> None:
    res, argv = run_launch(tmp_path, SLURM_NODEID="0", NPROC_PER_NODE="2")
    assert res.returncode == 0, res.stderr
    assert argv == [
        "torchrun",
        "--nnodes=2",
        "--node-rank=0",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        "--master-port=29555",
        "-m",
        "llmtrain.cli",
        "finetune",
        "/cfg/run.yaml",
        "lora.r=8",
    ]
    assert "launch: node_rank=0 nnodes=2 host=" in res.stdout
    assert "iface=lo nproc=2 gpus=0" in res.stdout
    assert (tmp_path / ".exit-codes" / "node0").read_text() == "0\n"


def test_accelerate_multi_node_has_machine_rank(tmp_path: Path) -> None:
    res, argv = run_launch(
        tmp_path,
        OMPI_COMM_WORLD_RANK="0",
        NPROC_PER_NODE="8",
        LAUNCHER="accelerate",
        ACCELERATE_CONFIG="/cfg/zero3.yaml",
    )
    assert res.returncode == 0, res.stderr
    assert argv == [
        "accelerate",
        "--num_machines=2",
        "--machine_rank=0",
        "--main_process_ip=127.0.0.1",
        "--main_process_port=29555",
        "--num_processes=16",
        "--config_file=/cfg/zero3.yaml",
        "--deepspeed_multinode_launcher=standard",
        "-m",
        "llmtrain.cli",
        "finetune",
        "/cfg/run.yaml",
        "lora.r=8",
    ]


def test_gpus_from_cuda_visible_devices_and_preset_interface(tmp_path: Path) -> None:
    res, argv = run_launch(
        tmp_path,
        NNODES="1",
        CUDA_VISIBLE_DEVICES="0,1,2,3",
        NCCL_SOCKET_IFNAME="ib0",
        LAUNCHER="accelerate",
    )
    assert res.returncode == 0, res.stderr
    assert "iface=ib0 nproc=4 gpus=4" in res.stdout
    assert argv[:6] == [
        "accelerate",
        "--num_machines=1",
        "--machine_rank=0",
        "--main_process_ip=127.0.0.1",
        "--main_process_port=29555",
        "--num_processes=4",
    ]
    assert argv[6] == "--multi_gpu"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "no node rank"),
        ({"SLURM_NODEID": "1"}, "node rank 1 runs on the head 127.0.0.1"),
        ({"PMI_RANK": "2"}, "node rank 2 is not below NNODES=2"),
        ({"SLURM_NODEID": "0", "MASTER_PORT": ""}, "MASTER_PORT is not set"),
        ({"NODE_RANK": "0", "LAUNCHER": "deepspeed"}, "LAUNCHER=deepspeed is unknown"),
    ],
)
def test_refusals(tmp_path: Path, env: dict[str, str], message: str) -> None:
    res, argv = run_launch(tmp_path, **env)
    assert res.returncode == 64
    assert message in res.stderr
    assert argv == []


def test_first_failure_code_is_kept(tmp_path: Path) -> None:
    res, _ = run_launch(tmp_path, NODE_RANK="0", NNODES="1", STANDIN_STEP_RC="75")
    assert res.returncode == 75
    assert (tmp_path / ".exit-codes" / "node0").read_text() == "75\n"
