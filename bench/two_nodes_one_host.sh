#!/usr/bin/env bash
# "Two nodes on one host": two network namespaces joined by a veth pair stand for two nodes;
# each runs entrypoint/launch.sh with one GPU (static rendezvous at the first namespace's
# address). NCCL's peer-to-peer and shared-memory transports are turned off, so its traffic
# goes over the socket interface launch.sh picked; the NCCL_DEBUG lines in node*.log show it.
# Needs root, iproute2, nsenter and two GPUs.
#
# usage: bench/two_nodes_one_host.sh OUT_DIR CONFIG [key=value ...]
set -euo pipefail

NS=(llmtrain-node0 llmtrain-node1)
ADDR=(10.77.0.1 10.77.0.2)
PORT=29577

say() { printf 'two_nodes_one_host: %s\n' "$*" >&2; }

cleanup() {
  local ns
  for ns in "${NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
}

main() {
  (($# >= 2)) || { echo "usage: two_nodes_one_host.sh OUT_DIR CONFIG [key=value ...]" >&2; exit 64; }
  local out="$1"
  shift
  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  mkdir -p "$out"
  cleanup
  trap cleanup EXIT
  ip netns add "${NS[0]}"
  ip netns add "${NS[1]}"
  ip link add llmtrain-v0 netns "${NS[0]}" type veth peer name llmtrain-v1 netns "${NS[1]}"
  local i
  for i in 0 1; do
    ip -n "${NS[i]}" addr add "${ADDR[i]}/24" dev "llmtrain-v$i"
    ip -n "${NS[i]}" link set lo up
    ip -n "${NS[i]}" link set "llmtrain-v$i" up
  done
  local pids=()
  for i in 0 1; do
    # nsenter, not `ip netns exec`: that remounts /sys, where NCCL reads the GPU topology.
    nsenter --net="/run/netns/${NS[i]}" env \
      CUDA_VISIBLE_DEVICES="$i" NNODES=2 NODE_RANK="$i" NPROC_PER_NODE=1 \
      MASTER_ADDR="${ADDR[0]}" MASTER_PORT="$PORT" \
      NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_DEBUG=INFO \
      NCCL_DEBUG_SUBSYS=INIT,NET \
      "$repo/entrypoint/launch.sh" "$@" output.dir="$out/run" >"$out/node$i.log" 2>&1 &
    pids+=("$!")
  done
  local rc=0 pid
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  say "exit $rc; interfaces and transport:"
  grep -h -E '^launch:|NET/Socket : Using|via NET/Socket' "$out"/node*.log | sort -u | head -n 8 >&2 || true
  return "$rc"
}

main "$@"
