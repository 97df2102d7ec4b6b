"""`llmtrain doctor` launched as training is: torchrun, two processes, gloo on this CPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmtrain.verbs.doctor import bus_bandwidth, parse_nccl_transport

REPO = Path(__file__).resolve().parents[1]


def doctor(*args: str, tmp_path: Path) -> tuple[int, dict[str, Any], str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "llmtrain.cli", "doctor", *args, "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout
    start = out.index("{") if "{" in out else None
    assert start is not None, proc.stdout + proc.stderr
    summary: dict[str, Any] = json.JSONDecoder().raw_decode(out[start:])[0]
    return proc.returncode, summary, proc.stdout + proc.stderr


@pytest.mark.slow
def test_healthy_allocation_reports_every_rank_and_bus_bandwidth(tmp_path: Path) -> None:
    rc, s, log = doctor("configs/lora.yaml", f"output.dir={tmp_path / 'out'}", tmp_path=tmp_path)
    assert rc == 0, log
    assert sorted(r["rank"] for r in s["ranks"]) == [0, 1]
    assert all(r["output_writable"] and r["output_free_bytes"] > 0 for r in s["ranks"])
    ar = s["allreduce"]
    assert ar["backend"] == "gloo"
    assert ar["algbw_GBps"] > 0
    assert ar["busbw_GBps"] == pytest.approx(ar["algbw_GBps"] * 2 * (2 - 1) / 2)
    assert s["problems"] == [] and s["faults"] == []


@pytest.mark.slow
def test_model_without_weights_is_refused_with_the_reason(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    rc, s, log = doctor("configs/lora.yaml", f"model.path={model}",
                        f"output.dir={tmp_path / 'out'}", tmp_path=tmp_path)
    assert rc != 0, log  # torchrun turns any failed worker into 1; the worker exits 64
    assert s["status"] == 64
    assert any("no weights" in p for p in s["problems"]), s["problems"]


@pytest.mark.slow
def test_unwritable_output_directory_is_refused_with_the_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, s, log = doctor("configs/lora.yaml", f"output.dir={blocker / 'out'}", tmp_path=tmp_path)
    assert rc != 0, log  # torchrun turns any failed worker into 1; the worker exits 64
    assert s["status"] == 64
    assert len([p for p in s["problems"] if "not writable" in p]) == 2  # both ranks say so


@pytest.mark.slow
def test_hub_model_missing_from_offline_cache(tmp_path: Path) -> None:
    rc, s, log = doctor("configs/lora.yaml", "model.path=someorg/not-cached-7b",
                        f"output.dir={tmp_path / 'out'}", tmp_path=tmp_path)
    assert rc != 0, log  # torchrun turns any failed worker into 1; the worker exits 64
    assert s["status"] == 64
    assert any("not in the offline cache" in p for p in s["problems"]), s["problems"]


def test_bus_bandwidth_is_nccl_tests_formula() -> None:
    algbw, busbw = bus_bandwidth(8 * 10**9, 0.1, 8)
    assert algbw == pytest.approx(80.0)
    assert busbw == pytest.approx(80.0 * 2 * 7 / 8)


def test_transport_is_read_from_nccl_info_lines() -> None:
    ib = (
        "node1:123:456 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB ; "
        "OOB ib0:10.1.0.1<0>\n"
        "node1:123:456 [0] NCCL INFO Using network IB\n"
    )
    assert parse_nccl_transport(ib) == {
        "network": "IB", "interfaces": "[0]mlx5_0:1/IB [1]mlx5_1:1/IB ; OOB ib0:10.1.0.1<0>"}
    sock = ("n:1:1 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.0.5<0>\n"
            "n:1:1 [0] NCCL INFO Using network Socket\n")
    assert parse_nccl_transport(sock) == {"network": "Socket", "interfaces": "[0]eth0:10.0.0.5<0>"}
    assert parse_nccl_transport("") == {"network": None, "interfaces": None}


def test_one_node_reports_intra_node_transport_not_the_network_plugin(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from llmtrain.verbs.doctor import _summarise

    report = {
        "rank": 0, "host": "n1", "local_rank": 0, "gpus": ["H200"], "driver": "1",
        "cuda": "13", "nccl": "2", "shm_bytes": 2**31, "output_writable": True,
        "output_free_bytes": 2**40, "problems": [], "faults": [], "warnings": [],
    }  # fmt: skip
    timing = {
        "backend": "nccl", "bytes": 2**28, "seconds": 0.01, "algbw_GBps": 200.0,
        "busbw_GBps": 300.0, "network": "Socket", "interfaces": "[0]eth0",
    }  # fmt: skip
    _summarise([(report, timing), ({**report, "rank": 1, "local_rank": 1}, timing)], False)
    one_node = capsys.readouterr().out
    assert "transport intra-node" in one_node and "Socket" not in one_node
    _summarise([(report, timing), ({**report, "rank": 1, "host": "n2"}, timing)], False)
    two_nodes = capsys.readouterr().out
    assert "transport Socket, interface [0]eth0" in two_nodes
    assert "NCCL uses sockets between nodes" in two_nodes
