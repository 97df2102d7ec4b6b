"""`llmtrain doctor`: preflight an allocation, launched like training (torchrun on every node).

Every rank reports its GPUs, versions, /dev/shm and the output directory; all ranks time an
all-reduce over the whole job (NCCL on GPUs, gloo on CPU) and rank 0 prints one summary with
bus bandwidth as nccl-tests computes it (busbw = algbw x 2(n-1)/n). Exit 0 when the run can
start, 64 when the config points at something missing (model or data not in the offline cache,
output directory not writable), 1 when the allocation itself is broken.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from llmtrain.errors import EXIT_OK, EXIT_USAGE
from llmtrain.manifest import command_output

EXAMPLE = "torchrun --nnodes 2 --nproc-per-node 4 ... -m llmtrain.cli doctor configs/lora.yaml"
EXIT_BROKEN = 1
SHM_MIN_BYTES = 1024**3  # container default is 64 MiB: NCCL's SHM transport and workers fail
FREE_MIN_BYTES = 10 * 1024**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="run config: checks its model, data, output")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--output-dir", help="directory to check without a config")
    parser.add_argument("--size-mb", type=float, help="all-reduce size (default GPU 256, CPU 16)")
    parser.add_argument("--iters", type=int, default=10, help="timed all-reduce iterations")
    parser.add_argument("--json", action="store_true", help="machine-readable summary")


@dataclass
class RankReport:
    rank: int
    local_rank: int
    host: str
    gpus: list[str]
    driver: str | None
    cuda: str | None
    nccl: str | None
    shm_bytes: int
    output_free_bytes: int | None
    output_writable: bool | None
    output_error: str | None
    problems: list[str] = field(default_factory=list)  # config: exit 64
    faults: list[str] = field(default_factory=list)  # allocation: exit 1
    warnings: list[str] = field(default_factory=list)


def _driver_version() -> str | None:
    out = command_output(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], timeout=30
    )
    return out.splitlines()[0] if out else None


def _check_output(path: Path) -> tuple[int | None, bool, str | None]:
    """Free bytes and writability, by creating the directory and a file in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-") as f:
            f.write(b"ok")
            f.flush()
        return shutil.disk_usage(path).free, True, None
    except OSError as exc:
        return None, False, f"{exc.strerror or exc} ({path})"


def _model_cached(path: str, revision: str | None) -> str | None:
    """None when the model's config and weights can be loaded offline, else the reason."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            return f"model directory {path} has no config.json"
        if not any(any(local.glob(p)) for p in ("*.safetensors", "*.bin", "*.pt")):
            return f"model directory {path} has no weights (*.safetensors / *.bin)"
        return None
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:
        return f"model directory {path} does not exist"
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(path, "config.json", revision=revision)
    if not isinstance(hit, str):
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        return f"model {path} is not in the offline cache (HF_HOME={home})"
    snapshot = Path(hit).parent
    if not any(any(snapshot.glob(p)) for p in ("*.safetensors", "*.bin")):
        return f"model {path} is cached without weights ({snapshot})"
    return None


def _data_cached(path: str, fmt: str) -> str | None:
    local = Path(path).expanduser()
    if local.exists():
        return None
    if fmt not in ("auto", "hub") or path.startswith(("/", ".", "~")) or "." in Path(path).name:
        return f"data.path {path} does not exist"
    from datasets import config as ds_config

    cache = Path(ds_config.HF_DATASETS_CACHE)
    hub = cache.parent / "hub" / f"datasets--{path.replace('/', '--')}"
    if glob.glob(str(cache / f"{path.replace('/', '___')}*")) or hub.is_dir():
        return None
    return f"dataset {path} is not in the offline cache ({ds_config.HF_DATASETS_CACHE})"


def _local_report(args: argparse.Namespace, rank: int, local_rank: int) -> RankReport:
    import torch

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    shm = shutil.disk_usage("/dev/shm").total if Path("/dev/shm").is_dir() else 0
    cfg = _load(args)
    out_dir = Path(cfg.output.dir) if cfg else Path(args.output_dir) if args.output_dir else None
    free, writable, err = _check_output(out_dir) if out_dir else (None, None, None)
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda else None
    rep = RankReport(
        rank=rank,
        local_rank=local_rank,
        host=socket.gethostname(),
        gpus=gpus,
        driver=_driver_version() if cuda else None,
        cuda=torch.version.cuda if cuda else None,
        nccl=nccl,
        shm_bytes=shm,
        output_free_bytes=free,
        output_writable=writable,
        output_error=err,
    )
    if writable is False:
        rep.problems.append(f"output directory is not writable: {err}")
    elif free is not None and free < FREE_MIN_BYTES:
        rep.warnings.append(f"only {free / 1024**3:.1f} GiB free in {out_dir}")
    if shm < SHM_MIN_BYTES:
        rep.warnings.append(
            f"/dev/shm is {shm / 1024**2:.0f} MiB: NCCL SHM and data workers "
            "need more (--shm-size, or a larger tmpfs)"
        )
    if cuda and local_rank >= len(gpus):
        rep.faults.append(f"local rank {local_rank} has no GPU: only {len(gpus)} visible")
    if os.environ.get("LLMTRAIN_EXPECT_GPU") == "1" and not cuda:
        rep.faults.append("no CUDA GPU visible to torch")
    if cfg is not None and local_rank == 0:
        if reason := _model_cached(cfg.model.resolved_path(), cfg.model.revision):
            rep.problems.append(reason)
        if reason := _data_cached(cfg.data.resolved_path(), cfg.data.format):
            rep.problems.append(reason)
    return rep


def _load(args: argparse.Namespace) -> Any:
    if not args.config:
        return None
    from llmtrain.config import load_config

    return load_config(args.config, args.overrides)


def _nccl_log_setup() -> Path | None:
    """Have NCCL say which transport and interface it picked, into a file we can read."""
    if "NCCL_DEBUG_FILE" in os.environ or os.environ.get("NCCL_DEBUG", "").upper() == "WARN":
        return None
    directory = Path(tempfile.mkdtemp(prefix="llmtrain-doctor-"))
    os.environ.setdefault("NCCL_DEBUG", "INFO")
    os.environ.setdefault("NCCL_DEBUG_SUBSYS", "INIT,NET")
    os.environ["NCCL_DEBUG_FILE"] = str(directory / "nccl.%h.%p.log")
    return directory


def parse_nccl_transport(text: str) -> dict[str, str | None]:
    """NCCL INFO lines: 'Using network IB' / 'Using network Socket' and the interfaces of
    'NET/IB : Using [0]mlx5_0:1/IB' or 'NET/Socket : Using [0]eth0:10.0.0.1<0>'."""
    net = re.findall(r"Using network (\w+)", text)
    ifaces = re.findall(r"NET/(?:IB|Socket)\s*:\s*Using (.+)", text)
    return {
        "network": net[-1] if net else None,
        "interfaces": ifaces[-1].strip() if ifaces else None,
    }


def _gloo_interface() -> str | None:
    if name := os.environ.get("GLOO_SOCKET_IFNAME"):
        return name
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        return None
    try:
        ip = socket.gethostbyname(addr)
    except OSError:
        return None
    out = command_output(["ip", "route", "get", ip], timeout=10)
    found = re.search(r"\bdev (\S+)", out or "")
    return found.group(1) if found else None


def bus_bandwidth(bytes_: int, seconds: float, world: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s as nccl-tests reports an all-reduce."""
    algbw = bytes_ / seconds / 1e9
    return algbw, algbw * (2 * (world - 1) / world if world > 1 else 0.0)


def _allreduce(size_bytes: int, iters: int, device: Any) -> float:
    import torch
    import torch.distributed as dist

    x = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    for _ in range(3):
        dist.all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    nccl_dir = _nccl_log_setup() if cuda else None
    report = _local_report(args, rank, local_rank)
    timing: dict[str, Any] = {}
    if world > 1 or "MASTER_ADDR" in os.environ:
        on_gpu = cuda and not report.faults
        device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=5))
        size = int((args.size_mb or (256 if backend == "nccl" else 16)) * 1024**2)
        seconds = _allreduce(size, args.iters, device)
        algbw, busbw = bus_bandwidth(size, seconds, world)
        transport = {"network": "gloo TCP", "interfaces": _gloo_interface()}
        if nccl_dir is not None:
            text = "".join(p.read_text(errors="replace") for p in nccl_dir.glob("*.log"))
            transport = parse_nccl_transport(text)
        timing = {
            "backend": backend,
            "bytes": size,
            "seconds": seconds,
            "algbw_GBps": algbw,
            "busbw_GBps": busbw,
            **transport,
        }
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (asdict(report), timing))
    else:
        gathered = [(asdict(report), timing)]
    status = EXIT_OK
    if rank == 0:
        status = _summarise(gathered, args.json)
    if world > 1:
        box = [status]
        dist.broadcast_object_list(box, src=0)
        status = box[0]
        dist.destroy_process_group()
    return status


def _summarise(gathered: list[Any], as_json: bool) -> int:
    reports = [r for r, _ in gathered]
    timing = gathered[0][1]
    hosts = sorted({r["host"] for r in reports})
    problems = [f"rank {r['rank']} ({r['host']}): {p}" for r in reports for p in r["problems"]]
    faults = [f"rank {r['rank']} ({r['host']}): {p}" for r in reports for p in r["faults"]]
    warnings = sorted({f"{r['host']}: {w}" for r in reports for w in r["warnings"]})
    if len(hosts) > 1 and timing.get("network") == "Socket":
        warnings.append(
            "NCCL uses sockets between nodes, not InfiniBand: expect a fraction of "
            "the bandwidth (check NCCL_IB_HCA, NCCL_SOCKET_IFNAME, the container's "
            "/dev/infiniband)"
        )
    status = EXIT_USAGE if problems else EXIT_BROKEN if faults else EXIT_OK
    if as_json:
        print(
            json.dumps(
                {
                    "status": status,
                    "ranks": reports,
                    "allreduce": timing,
                    "problems": problems,
                    "faults": faults,
                    "warnings": warnings,
                },
                indent=2,
            )
        )
        return status
    print(f"llmtrain doctor: {len(reports)} rank(s) on {len(hosts)} node(s): {', '.join(hosts)}")
    for r in reports:
        gpus = ", ".join(r["gpus"]) or "no GPU"
        free = r["output_free_bytes"]
        print(
            f"  rank {r['rank']} {r['host']} local {r['local_rank']}: {gpus}; "
            f"driver {r['driver'] or '-'}, CUDA {r['cuda'] or '-'}, NCCL {r['nccl'] or '-'}; "
            f"/dev/shm {r['shm_bytes'] / 1024**3:.1f} GiB; output "
            + (
                "-"
                if r["output_writable"] is None
                else f"{'writable' if r['output_writable'] else 'NOT writable'}"
                + (f", {free / 1024**3:.0f} GiB free" if free is not None else "")
            )
        )
    if timing:
        # NCCL names its network plugin on one node too ("Using network Socket"), where the
        # channels run over P2P/NVLink or shared memory and the network carries nothing.
        between_nodes = len(hosts) > 1 and timing["network"]
        print(
            f"  all-reduce ({timing['backend']}, {timing['bytes'] / 1024**2:.0f} MiB): "
            f"algbw {timing['algbw_GBps']:.2f} GB/s, busbw {timing['busbw_GBps']:.2f} GB/s; "
            + (
                f"transport {timing['network']}, interface {timing['interfaces'] or '-'}"
                if between_nodes
                else "transport intra-node (P2P/NVLink or shared memory)"
            )
        )
    for w in warnings:
        print(f"  warning: {w}")
    for p in problems + faults:
        print(f"  PROBLEM: {p}")
    print("  verdict: " + ("ready" if status == EXIT_OK else f"will not run (exit {status})"))
    return status
